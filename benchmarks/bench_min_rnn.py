"""minGRU / minLSTM against the GRU / LSTM they simplify (issue 14, claims_min_rnn): forward + backward
time of one layer at sequence lengths T, side by side in one run, median of repeats.

    python benchmarks/bench_min_rnn.py --threads 1                              # T = 512 ... 4096
    python benchmarks/bench_min_rnn.py --threads 1 --batch 4 --dim 64 --lengths 512 1024 --plot out.png

Methods, each a layer from d to d with its input projections, timed on the same random input:
  mingru / minlstm      the parallel form (gateloop's mixers, default mode: the blocked scan)
  nn.GRU / nn.LSTM      torch's fused recurrent kernel (one C++ loop over time; cuDNN on a GPU)
  GRU loop / LSTM loop  nn.GRUCell / nn.LSTMCell stepped in Python: backpropagation through time as
                        the paper's baselines ran it (their 175x / 235x at T = 512 are against these)
The ratios are each sequential method's time over the min-RNN's. Only ratios measured in one run
carry between machines. The loops are skipped above --max-loop-T (they grow slowest to run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _timing import median_time, print_table, write_csv  # noqa: E402

from gateloop.layers import MIXERS  # noqa: E402


class CellLoop(nn.Module):
    """A GRU / LSTM cell stepped over time in Python: x [B, T, d] -> h [B, T, d]."""

    def __init__(self, cell: nn.Module, lstm: bool):
        super().__init__()
        self.cell, self.lstm = cell, lstm

    def forward(self, x):
        B, T, _ = x.shape
        h = x.new_zeros(B, self.cell.hidden_size)
        c = torch.zeros_like(h) if self.lstm else None
        out = []
        for t in range(T):
            if self.lstm:
                h, c = self.cell(x[:, t], (h, c))
            else:
                h = self.cell(x[:, t], h)
            out.append(h)
        return torch.stack(out, 1)


def methods(d: int) -> dict[str, tuple[str, nn.Module]]:
    """name -> (family, module whose forward gives [B, T, d] or a tuple starting with it)."""
    return {"mingru": ("gru", MIXERS["mingru"](d)), "nn.GRU": ("gru", nn.GRU(d, d, batch_first=True)),
            "GRU loop": ("gru", CellLoop(nn.GRUCell(d, d), lstm=False)),
            "minlstm": ("lstm", MIXERS["minlstm"](d)), "nn.LSTM": ("lstm", nn.LSTM(d, d, batch_first=True)),
            "LSTM loop": ("lstm", CellLoop(nn.LSTMCell(d, d), lstm=True))}


def fwd_bwd_ms(module: nn.Module, x: torch.Tensor, repeat: int) -> float:
    def step():
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).square().mean().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    return 1e3 * median_time(step, warmup=1, repeat=repeat, budget_s=30.0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-loop-T", type=int, default=4096, help="skip the Python cell loops above this T")
    ap.add_argument("--plot", help="also write a PNG of time against T")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mods = methods(args.dim)
    rows = []
    for T in args.lengths:
        x = torch.randn(args.batch, T, args.dim, requires_grad=True)
        row: dict = {"T": T}
        for name, (_, module) in mods.items():
            skip = name.endswith("loop") and T > args.max_loop_T
            row[f"{name} ms"] = float("nan") if skip else fwd_bwd_ms(module, x, args.repeat)
        for base, peers in (("mingru", ("nn.GRU", "GRU loop")), ("minlstm", ("nn.LSTM", "LSTM loop"))):
            for peer in peers:
                row[f"{peer} / {base}"] = row[f"{peer} ms"] / row[f"{base} ms"]
        rows.append(row)
        print(f"T = {T} done", file=sys.stderr)
    print(f"forward + backward, one layer, B = {args.batch}, d = {args.dim}, {args.threads} thread(s); "
          f"median of up to {args.repeat}")
    print_table(rows)
    write_csv(rows, "bench_min_rnn.csv")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in mods:
            ax.plot([r["T"] for r in rows], [r[f"{name} ms"] for r in rows], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="forward + backward (ms)",
               title=f"B = {args.batch}, d = {args.dim}, {args.threads} thread(s)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
