"""Diagonal linear recurrence h_t = a_t * h_{t-1} + x_t: a loop, a log-depth parallel scan, and the
fast path: a blocked scan (O(T) work) with a hand-written backward (linear_recurrence).

All work on real or complex tensors along dim 1 (time), with `a` broadcastable to `x`.
The scan is Hillis-Steele: ceil(log2 T) combine steps, each one vectorised over all t, using
(a1, x1) o (a2, x2) = (a2 a1, a2 x1 + x2). It multiplies the transitions directly (|a| <= 1), so
products only shrink: no overflow, and complex phases are never accumulated as unbounded angles.
"""

from __future__ import annotations

import math

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


# ---------------------------------------------------------------------------------------------------
# The fast path: a blocked scan with O(T) work and about 2 sqrt(T) sequential steps, and a hand-written
# backward (the adjoint of a linear recurrence is the same recurrence run backwards in time).

_LOOP_MAX = 48  # up to this length a plain loop is as cheap as the blocked form


def _block_size(T: int) -> int:
    """Steps per block: the power of two nearest sqrt(T) from above, so that the loop inside blocks
    (C steps) and the scan over block ends (recursive, about sqrt(T / C) + ... steps) stay short."""
    return 1 << max(1, math.ceil(math.log2(T) / 2))


def _scan_loop(a: Tensor, x: Tensor, dim: int, reverse: bool, h_in: Tensor | None,
               out: Tensor | None = None) -> Tensor:
    """out[i] = a[i] * out[i -+ 1] + x[i] along dim, with out[-+1] = h_in (None: zero). Writes
    every state into out when given; returns the last state (and the product of all a is not kept)."""
    n = x.shape[dim]
    prev = h_in
    for i in (range(n - 1, -1, -1) if reverse else range(n)):
        x_i = x.select(dim, i)
        o_i = None if out is None else out.select(dim, i)
        if prev is None:
            prev = x_i if o_i is None else o_i.copy_(x_i)
        elif o_i is None:
            prev = torch.addcmul(x_i, a.select(dim, i), prev)
        else:
            prev = torch.addcmul(x_i, a.select(dim, i), prev, out=o_i)
    return prev


def _prod_loop(a: Tensor, dim: int) -> Tensor:
    """The product of a along dim by a loop of multiplications (torch.prod and cumprod are slow on
    complex CPU tensors; the slabs here are small)."""
    p = a.select(dim, 0)
    for i in range(1, a.shape[dim]):
        p = p * a.select(dim, i)
    return p


def scan_blocked(a: Tensor, x: Tensor, h0: Tensor | None = None, *, reverse: bool = False) -> Tensor:
    """All states of h_t = a_t h_{t-1} + x_t along dim 1, without autograd; reverse=True runs
    h_t = a_t h_{t+1} + x_t from the end, h0 then entering after the last step (h_T = h0).
    a: broadcastable to x, [B, T, ...]; h0: x[:, 0]-shaped or None (zero). Returns the promoted dtype.

    Blocks of C ~ sqrt(T) steps, three passes: (1) every block's end state from zero and the product
    of its transitions, a loop of C steps over [B, T / C, ...] slabs; (2) the true block ends, by the
    same scan one level up (recursive); (3) the loop again, each block started from its true
    incoming state, writing every state. Work O(T), about 2 sqrt(T) sequential steps; like the
    log-depth scan it multiplies transitions directly, so with |a| <= 1 products only shrink.
    """
    B, T = x.shape[:2]
    dtype = torch.promote_types(a.dtype, x.dtype)
    a = a.expand(*x.shape[:2], *a.shape[2:])
    if h0 is not None:
        h0 = h0.to(dtype)
    shape = torch.broadcast_shapes(a.shape, x.shape)
    if T <= _LOOP_MAX:
        out = torch.empty(shape, dtype=dtype, device=x.device)
        _scan_loop(a, x, 1, reverse, h0, out)
        return out
    C = _block_size(T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # padded steps at the end: a = 1, x = 0, so they pass states through unchanged
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], dim=1)
        a = torch.cat([a, a.new_ones(B, pad, *a.shape[2:])], dim=1)
    xb = x.reshape(B, N, C, *x.shape[2:])
    ab = a.reshape(B, N, C, *a.shape[2:])
    local = _scan_loop(ab, xb, 2, reverse, None)  # [B, N, ...]: each block's far-end state from zero
    P = _prod_loop(ab, 2)  # [B, N, ...]: the product of each block's transitions
    ends = scan_blocked(P, local, h0, reverse=reverse)  # true far-end states
    zero = torch.zeros_like(ends[:, :1]) if h0 is None else h0.unsqueeze(1)
    h_in = torch.cat([ends[:, 1:], zero], 1) if reverse else torch.cat([zero, ends[:, :-1]], 1)
    out = torch.empty(B, N, C, *shape[2:], dtype=dtype, device=x.device)
    _scan_loop(ab, xb, 2, reverse, h_in, out)
    return out.reshape(B, N * C, *shape[2:])[:, :T]


def _sum_to(x: Tensor, shape: torch.Size, real: bool) -> Tensor:
    """Reduce a gradient over the dims its input was broadcast along; its real part for a real input."""
    if x.shape != shape:
        dims = [i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1]
        x = x.sum(dim=dims, keepdim=True)
    return x.real if real and x.is_complex() else x


class _LinearRecurrence(torch.autograd.Function):
    """h = scan_blocked(a, x, h0) with the backward written out. With r_t = dL/dh_t accumulated
    backwards, r_t = g_t + conj(a_{t+1}) r_{t+1}: dL/dx_t = r_t, dL/da_t = r_t conj(h_{t-1}),
    dL/dh0 = conj(a_1) r_1 (PyTorch's convention for complex gradients: conjugate Wirtinger)."""

    @staticmethod
    def forward(ctx, a, x, h0):
        h = scan_blocked(a, x, h0)
        ctx.save_for_backward(a, h, h0)
        ctx.x_meta = (x.shape, x.is_complex())
        return h

    @staticmethod
    def backward(ctx, g):
        a, h, h0 = ctx.saved_tensors
        x_shape, x_complex = ctx.x_meta
        a_next = torch.cat([a[:, 1:].conj(), torch.zeros_like(a[:, :1])], dim=1)
        r = scan_blocked(a_next, g, reverse=True)
        grad_x = _sum_to(r, x_shape, not x_complex)
        grad_a = grad_h0 = None
        if ctx.needs_input_grad[0]:
            first = torch.zeros_like(h[:, :1]) if h0 is None else h0.unsqueeze(1).to(h.dtype)
            h_prev = torch.cat([first, h[:, :-1]], dim=1)
            grad_a = _sum_to(r * h_prev.conj(), a.shape, not a.is_complex())
        if h0 is not None and ctx.needs_input_grad[2]:
            grad_h0 = a[:, 0].conj() * r[:, 0]
        return grad_a, grad_x, grad_h0


def linear_recurrence(a: Tensor, x: Tensor, h0: Tensor | None = None) -> Tensor:
    """All states h_1..h_T of h_t = a_t h_{t-1} + x_t (dim 1 is time), differentiable, O(T) work:
    the blocked scan above with a hand-written backward. a: broadcastable to x; h0: x[:, 0]-shaped or
    None. The result has the promoted dtype of a and x (complex if either is)."""
    if h0 is not None:
        h0 = h0.to(torch.promote_types(a.dtype, x.dtype))
    return _LinearRecurrence.apply(a, x, h0)
