"""Time the four GateLoop modes, forward and forward+backward, as T grows.

    python benchmarks/bench_modes.py [--T 256 1024 4096] [--K 16 64] [--threads N]

Prints a markdown table (time in ms, and each mode's time relative to the chunk mode in the same
run) and writes benchmarks/out/modes.csv and modes.png (log-log time against T).
"""

from __future__ import annotations

import argparse

import torch
from _timing import OUT, median_time, print_table, write_csv

from gateloop.ops import GATELOOP_MODES


def inputs(B, T, H, K, per_head):
    q, k, v = (torch.randn(B, T, H, K, requires_grad=True) for _ in range(3))
    Kd = 1 if per_head else K
    log_a = torch.complex(-torch.rand(B, T, H, Kd) * 0.1, torch.rand(B, T, H, Kd)).requires_grad_()
    return q, k, v, log_a


def measure(mode, B, T, H, K, per_head, backward):
    args = inputs(B, T, H, K, per_head)
    op = GATELOOP_MODES[mode]

    def step():
        o, _ = op(*args)
        if backward:
            o.sum().backward()

    with torch.set_grad_enabled(backward):
        return median_time(step, repeat=3 if mode in ("recurrent", "scan") else 5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--K", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--B", type=int, default=2)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-quadratic-above", type=int, default=4096,
                        help="skip the O(T^2) attention mode beyond this T (its memory grows as T^2 K)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for K in args.K:
        for per_head in (False, True):
            for T in args.T:
                for backward in (False, True):
                    times = {}
                    for mode in GATELOOP_MODES:
                        if mode == "attention" and (T > args.skip_quadratic_above or (T > 1024 and not per_head)):
                            continue
                        times[mode] = measure(mode, args.B, T, args.H, K, per_head, backward)
                    for mode, t in times.items():
                        rows.append(dict(K=K, decay="head" if per_head else "channel", T=T,
                                         pass_="fwd+bwd" if backward else "fwd", mode=mode,
                                         ms=1e3 * t, vs_chunk=t / times["chunk"]))
                    print(f"K={K} decay={'head' if per_head else 'channel'} T={T} "
                          f"{'fwd+bwd' if backward else 'fwd'}: " +
                          ", ".join(f"{m} {1e3 * t:.1f} ms" for m, t in times.items()), flush=True)
    print(f"\nB={args.B}, H={args.H}, K=V, complex decays, {torch.get_num_threads()} threads\n")
    print_table(rows)
    write_csv(rows, "modes.csv")
    plot(rows)


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["K"], r["decay"], r["pass_"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (K, decay, pass_) in zip(axes[0], panels):
        for mode in GATELOOP_MODES:
            pts = [(r["T"], r["ms"]) for r in rows if (r["K"], r["decay"], r["pass_"], r["mode"]) ==
                   (K, decay, pass_, mode)]
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=mode)
        ax.set(title=f"K=V={K}, decay per {decay}, {pass_}", xlabel="T", ylabel="ms")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(OUT / "modes.png", dpi=110)


if __name__ == "__main__":
    main()
