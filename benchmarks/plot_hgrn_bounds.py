"""HGRN's forget-gate lower bounds per layer, read from trained runs: the claim of the HGRN paper's
ablation is that a bound rising with depth helps; with `lower_bound = "learned"` each layer moves its
own bound from the schedule k / n_layers, and this shows where training took them.

    python benchmarks/plot_hgrn_bounds.py runs/grid/claims_hgrn/lm/bounds-learned-seed* --out bounds.png

Prints one line per run (the mean bound of each layer) and draws, per run, the mean and the 10-90%
range of the layer's per-channel bounds, with the fixed schedule k / n_layers beside them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from gateloop.checkpoint import load_run  # noqa: E402
from gateloop.layers.hgrn import ForgetGate  # noqa: E402


def layer_bounds(run_dir: str) -> list[torch.Tensor]:
    """The per-channel lower bound gamma of each HGRN layer of a run, in layer order."""
    model, _, _ = load_run(run_dir)
    gates = [m for m in model.modules() if isinstance(m, ForgetGate)]
    if not gates:
        raise SystemExit(f"{run_dir}: no HGRN forget gates in this model")
    return [g.bound() for g in gates]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories of HGRN models")
    parser.add_argument("--out", default="hgrn_bounds.png")
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    n_layers = 0
    for run in args.runs:
        bounds = layer_bounds(run)
        n_layers = len(bounds)
        layers = range(n_layers)
        mean = [b.mean().item() for b in bounds]
        lo = [b.quantile(0.1).item() for b in bounds]
        hi = [b.quantile(0.9).item() for b in bounds]
        print(f"{run}: mean bound per layer " + ", ".join(f"{m:.3f}" for m in mean))
        ax.plot(layers, mean, marker="o", label=Path(run).name)
        ax.fill_between(layers, lo, hi, alpha=0.2)
    ax.plot(range(n_layers), [k / n_layers for k in range(n_layers)], "k--", label="schedule k / n_layers")
    ax.set_xlabel("layer")
    ax.set_ylabel("forget-gate lower bound gamma")
    ax.set_xticks(range(n_layers))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
