"""Diagonal linear recurrence h_t = a_t * h_{t-1} + x_t: a loop and a log-depth parallel scan.

Both work on real or complex tensors along dim 1 (time), with `a` broadcastable to `x`.
The scan is Hillis-Steele: ceil(log2 T) combine steps, each one vectorised over all t, using
(a1, x1) o (a2, x2) = (a2 a1, a2 x1 + x2). It multiplies the transitions directly (|a| <= 1), so
products only shrink: no overflow, and complex phases are never accumulated as unbounded angles.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_recurrence_loop(a: Tensor, x: Tensor, h0: Tensor | None = None) -> Tensor:
    """Reference: all states h_1..h_T of h_t = a_t h_{t-1} + x_t, by a plain loop. Returns like x."""
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0.to(x.dtype)
    out = []
    # unbind, not x[:, t]: its backward is one stack, where T slices would each scatter into a
    # full-size zero tensor (O(T^2) memory traffic).
    for a_t, x_t in zip(a.expand(x.shape[:2] + a.shape[2:]).unbind(1), x.unbind(1)):
        h = a_t * h + x_t
        out.append(h)
    return torch.stack(out, dim=1)


def linear_recurrence_scan(a: Tensor, x: Tensor, h0: Tensor | None = None) -> Tensor:
    """All states of h_t = a_t h_{t-1} + x_t by a parallel prefix scan in ceil(log2 T) steps.

    a: broadcastable to x, [B, T, ...]; x: [B, T, ...]; h0: x[:, 0]-shaped or None.
    """
    T = x.shape[1]
    d = 1
    while d < T:
        # After this step, (a[t], x[t]) summarise steps (t - 2d, t]: combine with the block ending at t - d.
        x = torch.cat([x[:, :d], x[:, d:] + a[:, d:] * x[:, :-d]], dim=1)
        a = torch.cat([a[:, :d], a[:, d:] * a[:, :-d]], dim=1)
        d *= 2
    if h0 is not None:
        # a now holds the inclusive products a_1 ... a_t.
        x = x + a * h0.unsqueeze(1).to(x.dtype)
    return x
