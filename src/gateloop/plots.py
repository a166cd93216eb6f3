"""Figures of training metrics (matplotlib, headless), each written atomically as PNG: the loss
curves of a run directory, a task run's learning curve, the loss at each position of a window.
pyplot() and save_png() serve every other figure of the package (the grid's, attention maps)."""

from __future__ import annotations

import io
from pathlib import Path

from .fileio import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot with the headless Agg backend (imported on first use: matplotlib is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 110) -> None:
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every metrics row that has key."""
    return [(r["step"], r[key]) for r in rows if key in r]


def plot_losses(rows: list[dict], path: Path, title: str = "") -> None:
    """Training loss per logged step and validation loss per evaluation (a language-model run)."""
    plt = pyplot()
    train, val = _series(rows, "train_loss"), _series(rows, "val_loss")
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.8)
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def plot_learning_curve(rows: list[dict], path: Path, title: str = "") -> None:
    """Training loss (left axis) and test accuracy (right axis) against step (a task run)."""
    plt = pyplot()
    loss, acc = _series(rows, "train_loss"), _series(rows, "test_accuracy")
    fig, ax = plt.subplots(figsize=(6, 4))
    if loss:
        ax.plot(*zip(*loss), color="tab:blue", alpha=0.8, label="train loss")
    ax.set(xlabel="step", ylabel="train loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    if acc:
        ax2.plot(*zip(*acc), color="tab:red", marker="o", label="test accuracy")
    ax2.set(ylabel="test accuracy", ylim=(0, 1.02))
    fig.legend(loc="center right", bbox_to_anchor=(0.85, 0.5))
    fig.tight_layout()
    save_png(fig, path)


def plot_per_position(curves: dict[str, list[float]], path: Path, title: str = "", smooth: int = 16) -> None:
    """Loss against position (log x), one line per curve, each a running mean over `smooth`
    positions (one window's positions are noisy)."""
    import numpy as np

    plt = pyplot()
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
    save_png(fig, path)
