"""Every GateLoop mode, forward and forward+backward, as T grows: the table of `gateloop bench` plus
CSV and a log-log plot of time against T per mode.

    python benchmarks/bench_modes.py [--T 128 512 2048 8192 16384] [--B 1] [--threads N] [...]

Options as for `gateloop bench` (gateloop.cli.add_bench_arguments). Writes benchmarks/out/modes.csv
and modes.png (one panel per shape and pass; recurrent, scan and chunk should be lines of slope 1,
attention of slope 2).
"""

from __future__ import annotations

import argparse

from _timing import OUT, write_csv

from gateloop.bench import main as bench_main
from gateloop.cli import add_bench_arguments


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["shape"], r["pass_"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (shape, pass_) in zip(axes[0], panels):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            pts = [(r["T"], r["ms"]) for r in rows
                   if (r["shape"], r["pass_"], r["mode"]) == (shape, pass_, mode) and r["ms"] is not None]
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=mode)
        ax.set(title=f"{shape}\n{pass_}", xlabel="T", ylabel="ms")
        ax.title.set_fontsize(9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    fig.savefig(OUT / "modes.png", dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_bench_arguments(parser)
    parser.set_defaults(T=[128, 512, 2048, 8192, 16384])
    rows = bench_main(parser.parse_args())
    write_csv([{k: ("" if v is None else v) for k, v in r.items()} for r in rows], "modes.csv")
    plot(rows)


if __name__ == "__main__":
    main()
