"""Pictures of trained task models: GateLoop's surrogate attention and its transitions.

GateLoop read as attention (src/gateloop/ops/README.md, the attention mode): with L_t = sum_{j<=t} log a_j,

    y_t = sum_{s<=t} A[t, s] v_s,   A[t, s] = Re( q_t^T diag(exp(L_t - L_s)) k_s )   per head,

a T x T map whose relative-position weighting exp(L_t - L_s) is controlled by the data: a transition
with |a| near 0 (a RESET, say) cuts every line of sight across it. attention_map() draws A for some
heads of one layer, on one task sequence, with the resets of memory_horizon marked, beside the
transitions |a_t| and arg a_t of every channel over time.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .errors import UserError
from .plots import pyplot, save_png


@torch.no_grad()
def surrogate_attention(mixer, x: Tensor) -> tuple[Tensor, Tensor]:
    """The GateLoop layer `mixer`'s attention map and transitions on one sequence x: [1, T, D].

    Returns A: [H, T, T] float64 (A[h, t, s] as in the module docstring; 0 for s > t) and
    log_a: [T, H, K|1] (complex when the layer uses complex transitions). A @ v equals the layer's
    op output y (before its norm and gate): the tests check it against the recurrent reference.
    """
    B, T, D = x.shape
    if B != 1:
        raise ValueError(f"one sequence at a time: x must be [1, T, D], got {tuple(x.shape)}")
    H, K = mixer.n_heads, mixer.head_dim
    q = (mixer.W_q(x).view(T, H, K) * K ** -0.5).double()
    k = mixer.W_k(x).view(T, H, K).double()
    log_a = mixer.compute_log_a(x)[0]  # [T, H, K|1]
    L = log_a.to(torch.complex128 if log_a.is_complex() else torch.float64).cumsum(0)
    diff = L[:, None] - L[None, :]  # [t, s, H, K|1]: L_t - L_s
    below = torch.ones(T, T, dtype=torch.bool).tril()[:, :, None, None]
    # Mask s > t before the exp, where L_t - L_s > 0 could overflow.
    magnitude = torch.exp(torch.where(below, diff.real, -math.inf))
    decay = magnitude * torch.cos(diff.imag) if diff.is_complex() else magnitude
    A = torch.einsum("thk,shk,tshk->hts", q, k, decay.expand(T, T, H, K))
    return A, log_a


def pick_heads(A: Tensor, log_a: Tensor, n_heads: int) -> list[int]:
    """The n_heads heads whose transition magnitudes vary most over the sequence (the ones the data
    controls); when none varies (fixed or no transitions), those with the largest maps."""
    variation = log_a.real.std(dim=0).mean(dim=-1) if log_a.shape[0] > 1 else torch.zeros(A.shape[0])  # [H]
    score = variation.double() if variation.max() > 1e-6 else A.flatten(1).norm(dim=1)
    return score.argsort(descending=True)[:n_heads].sort().values.tolist()


def attention_map(model, tokens: Tensor, path: Path, *, layer: int = 0, n_heads: int = 4,
                  resets: Tensor | None = None, title: str = "") -> list[int]:
    """Draw the surrogate attention of up to n_heads heads of GateLoop layer `layer` (see
    pick_heads), and |a_t|, arg a_t of every channel, on tokens [T]; returns the heads shown."""
    if not 0 <= layer < len(model.blocks):
        raise UserError(f"--layer must be in 0..{len(model.blocks) - 1}, got {layer}")
    mixer = model.blocks[layer].mixer
    if not hasattr(mixer, "compute_log_a"):
        raise UserError(f"the attention map needs a GateLoop model; this run's mixer is {model.cfg.mixer!r}")
    captured = {}
    handle = mixer.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            model(tokens[None])
    finally:
        handle.remove()
    A, log_a = surrogate_attention(mixer, captured["x"])
    T = A.shape[-1]
    heads = pick_heads(A, log_a, n_heads)
    marks = torch.nonzero(resets).flatten().tolist() if resets is not None else []

    plt = pyplot()
    cols = max(len(heads), 2)
    fig = plt.figure(figsize=(3.2 * cols, 6.4))
    grid = fig.add_gridspec(2, 2 * cols)
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    for i, h in enumerate(heads):
        ax = fig.add_subplot(grid[0, 2 * i:2 * i + 2])
        a = A[h].masked_fill(upper, math.nan)
        lim = float(A[h].abs().max()) or 1.0
        im = ax.imshow(a.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        for m in marks:
            ax.axvline(m, color="tab:green", lw=0.7, alpha=0.8)
            ax.axhline(m, color="tab:green", lw=0.7, alpha=0.8)
        ax.set(title=f"layer {layer}, head {h}", xlabel="source s", ylabel="target t" if i == 0 else None)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    channels = log_a.reshape(T, -1).t()  # [H * K, T]
    magnitude = channels.real.exp()
    panels = [("|a_t| (transition magnitude)", magnitude, "viridis", (min(float(magnitude.min()), 0.99), 1))]
    if log_a.is_complex():
        phase = torch.remainder(channels.imag + math.pi, 2 * math.pi) - math.pi
        lim = max(float(phase.abs().max()), 1e-3)
        panels.append(("arg a_t (phase, radians)", phase, "RdBu_r", (-lim, lim)))
    for i, (name, values, cmap, (lo, hi)) in enumerate(panels):
        ax = fig.add_subplot(grid[1, i * cols:(i + 1) * cols])
        im = ax.imshow(values.float().numpy(), aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        for m in marks:
            ax.axvline(m, color="tab:green", lw=0.7, alpha=0.8)
        ax.set(title=name, xlabel="time t", ylabel="channel (head x key)")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if marks:
        title = f"{title}  (green lines: RESET tokens)".strip()
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)
    return heads


def run_attention_map(run_dir: str | Path, out: str | Path | None = None, *, layer: int = 0, n_heads: int = 4,
                      seq_len: int | None = None, index: int = 0) -> Path:
    """The attention map of a trained task run (`gateloop task run`) on a test sequence of its task
    (memory_horizon: resets marked), written to out (default: run_dir/attention.png)."""
    from .data import synthetic
    from .tasks import load_task_run

    if n_heads < 1 or index < 0 or (seq_len is not None and seq_len < 1):
        raise UserError(f"--heads and --seq-len must be positive and --index >= 0, got {n_heads}, {seq_len}, {index}")
    model, cfg = load_task_run(run_dir)
    params = cfg.task.params()
    if seq_len is not None:
        params["seq_len"] = seq_len
    try:
        inputs, _ = synthetic.TASKS[cfg.task.name](index + 1, **params, seed=2 * cfg.train.seed + 1)
    except ValueError as e:
        raise UserError(f"--seq-len: {e}") from None
    tokens = inputs[index]
    resets = None
    if cfg.task.name == "memory_horizon":
        resets = tokens == synthetic.vocab_size("memory_horizon", **params) - 1
    out = Path(out) if out else Path(run_dir) / "attention.png"
    options = " ".join(f"{k}={v}" for k, v in cfg.model.mixer_options.items())
    attention_map(model, tokens, out, layer=layer, n_heads=n_heads, resets=resets,
                  title=f"{cfg.task.name}: GateLoop {options} surrogate attention".replace("  ", " "))
    return out
