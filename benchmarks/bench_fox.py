"""Time Forgetting Attention with and without Adaptive Computation Pruning, against causal SDPA.

    python benchmarks/bench_fox.py [--T 4096] [--B 1] [--H 8] [--K 64] [--threads N]

Inputs as a trained FoX Pro layer sees them: q and k RMS-normalised per head (unit scales, so
|q| = |k| = sqrt(K) and the ACP bound is U = sqrt(K)), v standard normal. Two forget-gate settings:
  mixed:  one constant gate per head, decay times tau (log f = -1/tau) log-uniform from 2 to 256
          steps over the heads: the mixer's "bias"/"fixed" initialisation, half the heads local.
  strong: data-dependent gates f_t = sigma(2 + z_t), z_t ~ N(0, 1) per head and step (f ~ 0.86,
          decay time ~ 7 steps) in every head.
Rows: F.scaled_dot_product_attention(is_causal=True) (softmax attention, no gate: the speed
reference), FoX exact, FoX with ACP (log eps = -10), forward and forward+backward. Prints a
markdown table (ms, time relative to exact FoX in the same run, pruned fraction of the causal
tiles, max |o_acp - o_exact| measured in float32 and in float64, and the guaranteed bound
2 eps max|v|) and writes benchmarks/out/fox.csv. CPU timings (the timer does not synchronise a GPU).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from _timing import median_time, print_table, write_csv

from gateloop.ops.forgetting_attn import forgetting_attention

LOG_TOL = -10.0


def inputs(setting, B, T, H, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, K, generator=g) for _ in range(3))
    q, k = (t * (K ** 0.5 / t.norm(dim=-1, keepdim=True)) for t in (q, k))  # RMS 1 per head: |q| = sqrt(K)
    if setting == "mixed":
        tau = torch.logspace(math.log10(2), math.log10(256), H)
        log_f = (-1 / tau).expand(B, T, H).contiguous()
    elif setting == "strong":
        log_f = F.logsigmoid(2 + torch.randn(B, T, H, generator=g))
    else:
        raise ValueError(f"unknown setting {setting!r}")
    return q, k, v, log_f


def measure(fn, args, backward):
    args = [a.detach().requires_grad_(backward) for a in args]

    def step():
        o = fn(*args)
        if backward:
            o.sum().backward()

    with torch.set_grad_enabled(backward):
        return median_time(step, repeat=5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=8)
    parser.add_argument("--K", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--settings", nargs="+", default=["mixed", "strong"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T, H, K, bs = args.B, args.T, args.H, args.K, args.block_size

    def sdpa(q, k, v, log_f):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True)

    def fox(q, k, v, log_f):
        return forgetting_attention(q, k, v, log_f, block_size=bs)

    def fox_acp(q, k, v, log_f):
        return forgetting_attention(q, k, v, log_f, block_size=bs, log_pruning_tolerance=LOG_TOL)

    rows = []
    for setting in args.settings:
        x = inputs(setting, B, T, H, K)
        with torch.no_grad():  # the error in float32 and, to see below float32's resolution, in float64
            _, stats = forgetting_attention(*x, block_size=bs, log_pruning_tolerance=LOG_TOL, return_stats=True)
            err32, err64 = ((fox_acp(*xd) - fox(*xd)).abs().max().item() for xd in (x, [t.double() for t in x]))
        bound = 2 * math.exp(LOG_TOL) * x[2].abs().max().item()
        for backward in (False, True):
            times = {name: measure(fn, x, backward) for name, fn in
                     (("sdpa (no gate)", sdpa), ("fox", fox), ("fox + acp", fox_acp))}
            for name, t in times.items():
                acp = name == "fox + acp"
                rows.append(dict(setting=setting, pass_="fwd+bwd" if backward else "fwd", impl=name, ms=1e3 * t,
                                 vs_fox=t / times["fox"], pruned=stats.pruned_fraction if acp else 0.0,
                                 err_f32=err32 if acp else 0.0, err_f64=err64 if acp else 0.0,
                                 err_bound=bound if acp else 0.0))
            print(f"{setting} {'fwd+bwd' if backward else 'fwd'}: " +
                  ", ".join(f"{n} {1e3 * t:.0f} ms" for n, t in times.items()), flush=True)
    print(f"\nB={B}, T={T}, H={H}, K=V={K}, block {bs}, float32, log eps = {LOG_TOL}, "
          f"{torch.get_num_threads()} threads\n")
    print_table(rows)
    write_csv(rows, "fox.csv")


if __name__ == "__main__":
    main()
