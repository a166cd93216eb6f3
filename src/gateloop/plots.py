"""Plots written into run directories (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path

from .fileio import atomic_write_bytes


def plot_losses(rows: list[dict], path: Path, title: str = "") -> None:
    """Training loss per logged step and validation loss per evaluation, saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.8)
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_per_position(curves: dict[str, list[float]], path: Path, title: str = "", smooth: int = 16) -> None:
    """Loss against position (log x), one line per curve, each a running mean over `smooth`
    positions (one window's positions are noisy); saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        y = np.asarray(losses, dtype=float)
        k = min(smooth, len(y))
        y = np.convolve(y, np.ones(k) / k, mode="valid") if k > 1 else y
        ax.plot(np.arange(1, len(y) + 1) + (k - 1) / 2, y, label=label)
    ax.set(xscale="log", xlabel="position in the window (tokens of context + 1)", ylabel="loss (nats/token)",
           title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
