"""Eager against torch.compile, side by side in one run: what `train.compile=true` buys.

    python benchmarks/bench_compile.py [--threads N] [--repeat 5]

Rows (printed as a table, written to benchmarks/out/compile.csv):
  lm/<mixer>: one training step (forward, backward, AdamW) of the demo language model
              (d_model 128, 4 layers, batch 16 x 256 bytes) for GateLoop and the Transformer baseline.
  op/chunk:   the GateLoop chunk op, forward+backward, B=4 T=2048 H=8 K=V=64, one complex decay
              per head (the shape of the performance targets).
Each row gives the eager and compiled median times, their ratio, and the one-off compile time
(the first compiled call, which traces and generates kernels). Compiled outputs are checked
against eager before timing.
"""

from __future__ import annotations

import argparse
import time

import torch
from _timing import median_time, print_table, write_csv

from gateloop.bench import SHAPES, make_inputs
from gateloop.models import LanguageModel, ModelConfig
from gateloop.ops import gateloop_chunk


def lm_step(mixer: str):
    """make_step(compiled) -> a training-step closure on a fresh, seeded model (the same for both)."""
    x = torch.randint(0, 256, (16, 257), generator=torch.Generator().manual_seed(0))

    def make_step(compiled: bool):
        torch.manual_seed(0)
        model = LanguageModel(ModelConfig(mixer=mixer))
        net = torch.compile(model) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            logits, _ = net(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return step

    return make_step


def chunk_step():
    args = make_inputs(4, 2048, SHAPES["multi-head, decay per head"], requires_grad=True)

    def make_step(compiled: bool):
        op = torch.compile(gateloop_chunk) if compiled else gateloop_chunk

        def step():
            o, _ = op(*args)
            o.backward(torch.ones_like(o))
            return o.detach().square().mean()

        return step

    return make_step


def measure(name: str, make_step, repeat: int) -> dict:
    eager, compiled = make_step(False), make_step(True)
    reference = eager()
    start = time.perf_counter()
    first = compiled()  # traces, generates and loads the kernels
    compile_s = time.perf_counter() - start
    gap = abs(first.item() - reference.item()) / abs(reference.item())
    assert gap < 1e-4, f"{name}: compiled result off eager's by {gap:.1e} (relative)"
    t_eager, t_compiled = (1e3 * median_time(fn, repeat=repeat) for fn in (eager, compiled))
    return {"case": name, "eager_ms": t_eager, "compiled_ms": t_compiled,
            "speedup": t_eager / t_compiled, "compile_s": compile_s, "first_step_rel_gap": gap}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cases = {"lm/gateloop": lm_step("gateloop"), "lm/transformer": lm_step("transformer"), "op/chunk": chunk_step()}
    rows = [measure(name, make_step, args.repeat) for name, make_step in cases.items()]
    print_table(rows)
    print(f"wrote {write_csv(rows, 'compile.csv')}")


if __name__ == "__main__":
    main()
