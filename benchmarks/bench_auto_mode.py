"""The measurements behind the GateLoop layer's mode=None (GateLoop.auto_mode): the chunk and scan ops
side by side, forward+backward, at the shapes the layer hands them (H = d_model / head_dim heads,
K = V = head_dim, a complex decay per head or per key channel), on this machine's CPU.

    python benchmarks/bench_auto_mode.py [--threads 1] [--d-model 512] [--B 2] [--T 1024] [--head-dims 16 32 64]
        [--decays head channel] [--passes fwd fwd+bwd] [--repeat 3]

Prints one row per shape with both times and the faster mode; rows go to benchmarks/out/auto_mode.csv.
GATELOOP_FUSED=0 in the environment times the scan's PyTorch path instead of the fused kernels.
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_time, print_table, write_csv

from gateloop.ops import gateloop_chunk, gateloop_scan
from gateloop.ops.gateloop_fused import fused_scan_available


def fwd_ms(op, args, repeat):
    with torch.no_grad():
        return 1e3 * median_time(lambda: op(*args), repeat=repeat)


def fwd_bwd_ms(op, args, repeat):
    def step():
        for x in args:
            x.grad = None
        o = op(*args)[0]
        o.backward(torch.ones_like(o))

    return 1e3 * median_time(step, repeat=repeat)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--B", type=int, default=2)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--decays", nargs="+", default=["head", "channel"], choices=["head", "channel"])
    parser.add_argument("--passes", nargs="+", default=["fwd+bwd"], choices=["fwd", "fwd+bwd"],
                        help="fwd: forward under torch.no_grad (evaluation, a prompt); fwd+bwd: training")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fused scan: {fused_scan_available(torch.zeros(1))}")
    rows = []
    for K in args.head_dims:
        for decay in args.decays:
            H, Kd = args.d_model // K, 1 if decay == "head" else K
            g = torch.Generator().manual_seed(0)
            x = [torch.randn(args.B, args.T, H, K, generator=g) for _ in range(3)]
            x.append(torch.complex(-0.1 * torch.rand(args.B, args.T, H, Kd, generator=g),
                                   torch.rand(args.B, args.T, H, Kd, generator=g)))
            x = [t.requires_grad_() for t in x]
            for pass_, timer in (("fwd (no grad)", fwd_ms), ("fwd+bwd", fwd_bwd_ms)):
                if pass_.split()[0] not in args.passes:
                    continue
                chunk, scan = timer(gateloop_chunk, x, args.repeat), timer(gateloop_scan, x, args.repeat)
                rows.append(dict(head_dim=K, decay=decay, H=H, pass_=pass_, chunk_ms=chunk, scan_ms=scan,
                                 faster="chunk" if chunk < scan else "scan", ratio=max(chunk, scan) / min(chunk, scan)))
            print(rows[-1], flush=True)
    print_table(rows)
    write_csv(rows, "auto_mode.csv")


if __name__ == "__main__":
    main()
