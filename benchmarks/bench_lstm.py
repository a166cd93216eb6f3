"""The LSTM mixer's training step (forward + backward) against torch.nn.LSTM, side by side, in CPU
time (time.process_time: on a shared machine wall time mostly measures the neighbours), one thread.

    python benchmarks/bench_lstm.py [--batch 16 --length 256 --units 128 --repeat 5]

Three rows: ours with the fused C++ loop (ops/lstm_fused.py), ours with GATELOOP_FUSED=0 (the same
loop in PyTorch, the kernel's reference), and torch.nn.LSTM (oneDNN on CPU). The NP variant is
torch.nn.LSTM's maths (docs/models/lstm.md). bench_peers.py's rnn section times the same in wall time.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from gateloop.bench import median_time
from gateloop.layers import MIXERS


def cpu_ms(fn, repeat: int) -> float:
    """Median CPU milliseconds of fn() over repeat calls, after one warm-up call."""
    return 1e3 * median_time(fn, repeat=repeat, clock=time.process_time)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--units", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.length, args.units)
    ours, peer = MIXERS["lstm"](args.units, variant="NP"), torch.nn.LSTM(args.units, args.units, batch_first=True)

    def step(module):
        for p in module.parameters():
            p.grad = None
        y = module(x)[0]
        y.backward(torch.ones_like(y))

    fused = cpu_ms(lambda: step(ours), args.repeat)
    os.environ["GATELOOP_FUSED"] = "0"
    unfused = cpu_ms(lambda: step(ours), args.repeat)
    del os.environ["GATELOOP_FUSED"]
    reference = cpu_ms(lambda: step(peer), args.repeat)
    print(f"B={args.batch} T={args.length} N={args.units}, forward+backward, CPU ms (one thread)")
    print(f"| ours, fused loop | {fused:.1f} | nn.LSTM / ours x{reference / fused:.2f} |")
    print(f"| ours, PyTorch loop (GATELOOP_FUSED=0) | {unfused:.1f} | x{unfused / fused:.2f} the fused time |")
    print(f"| torch.nn.LSTM | {reference:.1f} | |")


if __name__ == "__main__":
    main()
