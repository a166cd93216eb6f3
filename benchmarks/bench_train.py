"""Training speed of every model of a grid, side by side in one run: forward + backward + AdamW step of
the language model at the grid's size, tokens/s, the ratio to the Transformer, and the model FLOP
utilisation over the float32 GEMM rate measured in the same run, two ways: `mfu_6nd` counts 6 x
parameters x tokens (the mixers' own sequence work left out); `mfu_counted` counts every matrix
product of one step as torch.utils.flop_counter sees it (the attention scores, the chunk op's and the
recurrences' products, forward and backward), so it includes the mixers' own products. Elementwise
work (gates, scans) is in neither, and a product inside a C++ kernel (the fused scans and the LSTM
loop) is not seen by the counter either.

    python benchmarks/bench_train.py --threads 1                    # the leaderboard's models
    python benchmarks/bench_train.py --threads 2 --grid configs/grids/lm_board.toml --steps 5
    python benchmarks/bench_train.py --only hgrn --set model.mixer_options.mode=scan   # one mode against another

Each model is built as the grid's LM runs build it (its mixer, options and MLP width, the grid's
d_model, layers, batch and sequence length); batches are random bytes, the same for every model.
The leaderboard's tokens/s column comes from the training runs themselves, under whatever load the
machine had; the ratios here, measured one after another in one quiet process, are the ones that hold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).parent))
from _timing import median_time, print_table, write_csv  # noqa: E402

from gateloop.bench import gemm_gflops  # noqa: E402
from gateloop.checkpoint import build_model  # noqa: E402
from gateloop.config import load_config  # noqa: E402
from gateloop.grid import LM, load_grid  # noqa: E402
from gateloop.loop import cpu_settings  # noqa: E402
from gateloop.optim import make_optimizer  # noqa: E402


def cells(grid_path: str) -> list[tuple[str, list[str]]]:
    """(cell name, overrides) of each cell's first LM run, the learning rate aside (it costs nothing)."""
    grid = load_grid(grid_path)
    seen: dict[str, list[str]] = {}
    for run in grid.runs:
        if run.task == LM and run.cell not in seen:
            seen[run.cell] = [s for s in run.sets if not s.startswith(("train.lr=", "train.threads="))]
    return list(seen.items())


def _cpu_attention(q, k, v, dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
    """SDPA's CPU kernel, which torch's counter has no formula for: the products of the scores and
    of the weighted values, half of them under a causal mask (the kernel skips the masked blocks)."""
    return sdpa_flop_count(q, k, v) // (2 if is_causal else 1)


def _cpu_attention_backward(grad, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad, q, k, v) // (2 if is_causal else 1)


COUNT = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
         torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward}


def step_time(overrides: list[str], repeat: int) -> tuple[float, int, int, int]:
    """Median seconds of one training step, the parameter count, the tokens per step and the
    matrix-product FLOPs of one step (forward and backward, as FlopCounterMode counts them)."""
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = make_optimizer(model, cfg.train)
    tc = cfg.train
    x = torch.randint(0, cfg.model.vocab_size, (tc.batch_size, tc.seq_len + 1))

    def step():
        logits, _ = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_time(step, warmup=2, repeat=repeat, budget_s=60.0)
    with FlopCounterMode(display=False, custom_mapping=COUNT) as counter:
        step()
    return seconds, sum(p.numel() for p in model.parameters()), tc.batch_size * tc.seq_len, counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="configs/grids/lm_board_lr.toml",
                        help="the grid whose LM cells to time (default: the leaderboard's sweep, which "
                             "lists every board model whatever the state of its results)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (the median is reported)")
    parser.add_argument("--only", nargs="+", help="time only these cells")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key for every model, e.g. model.mixer_options.mode=scan")
    args = parser.parse_args()
    with cpu_settings(args.threads):  # as `gateloop train` runs: its threads, subnormals flushed
        run(args)


def run(args: argparse.Namespace) -> None:
    gemm = gemm_gflops()
    rows = []
    for name, overrides in cells(args.grid):
        if args.only and name not in args.only:
            continue
        seconds, params, tokens, flops = step_time(overrides + args.set, args.steps)
        rate = seconds * gemm * 1e9  # the FLOPs the GEMM rate would do in one step
        rows.append(dict(model=name, parameters=params, step_ms=seconds * 1e3, tokens_per_s=tokens / seconds,
                         mfu_6nd_percent=100 * 6 * params * tokens / rate, mfu_counted_percent=100 * flops / rate,
                         counted_gflop=flops / 1e9))
        print(f"{name}: {tokens / seconds:,.0f} tokens/s", file=sys.stderr, flush=True)
    base = next((r["tokens_per_s"] for r in rows if r["model"] == "transformer"), None)
    for r in rows:
        r["vs_transformer"] = r["tokens_per_s"] / base if base else float("nan")
    print(f"threads {args.threads}; float32 GEMM {gemm:.1f} GFLOP/s; grid {args.grid}")
    print_table(rows)
    print(f"csv: {write_csv(rows, f'bench_train_t{args.threads}.csv')}", file=sys.stderr)


if __name__ == "__main__":
    main()
