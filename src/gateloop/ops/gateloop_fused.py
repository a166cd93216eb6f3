"""Fused CPU kernels for GateLoop's scan mode (csrc/gateloop_scan.cpp).

In PyTorch the scan is a dozen elementwise passes over [B, T, H, K, V] slabs (the transition, k v^T,
the blocked recurrence, the output; twice as many backwards), and on CPU each pass costs more in
memory traffic and allocation than in arithmetic. The kernels run the recurrence and its output in
one loop over time, and the adjoint recurrence with every gradient in another (the equations are at
the top of the C++ file): one pair for the max-headed case (K = V = 1, the paper's default layer),
vectorised over heads, one for heads with a [K, V] state, vectorised over V. The transition
a = exp(log_a), real or complex, is computed a row at a time inside both loops and never stored.

The kernels are compiled on first use (ops/cpp.py). Where they cannot be built, or on other devices,
or with GATELOOP_FUSED=0 in the environment, gateloop_scan uses the PyTorch path (_GateLoopScan in
ops/gateloop.py), which is also the reference the tests compare them with.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .cpp import CSRC, build, fused_allowed

SOURCE = CSRC / "gateloop_scan.cpp"
NAME = "gateloop_scan_kernels"
# The chunk form's intra-chunk decay (one decay per head), used by ops/gateloop_chunk_head.py.
CHUNK_SOURCE = CSRC / "gateloop_chunk.cpp"
CHUNK_NAME = "gateloop_chunk_kernels"


@functools.cache
def _kernel():
    """The compiled scan module, or None where it cannot be built (ops/cpp.py)."""
    return build(NAME, SOURCE, "scan kernels", native=True)


@functools.cache
def chunk_kernel():
    """The compiled chunk module (csrc/gateloop_chunk.cpp), or None where it cannot be built."""
    return build(CHUNK_NAME, CHUNK_SOURCE, "chunk kernels")


@torch.compiler.disable  # under torch.compile, decide eagerly (Dynamo cannot trace the build)
def fused_scan_available(x: Tensor) -> bool:
    """Whether FusedScan can run on x's device (CPU, kernels built, not switched off)."""
    return fused_allowed(x) and _kernel() is not None


@torch.compiler.disable
def fused_chunk_available(x: Tensor) -> bool:
    """Whether chunk_kernel() can run on x's device (CPU, built, not switched off by GATELOOP_FUSED=0)."""
    return fused_allowed(x) and chunk_kernel() is not None


def _planes(x: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(real plane, imaginary plane or None), contiguous; (None, None) for None."""
    if x is None:
        return None, None
    if x.is_complex():
        return x.real.contiguous(), x.imag.contiguous()
    return x.contiguous(), None


def _log_a_plane(log_a: Tensor) -> Tensor:
    """log_a as the kernels read it: contiguous, a complex one as (real, imaginary) pairs [..., 2]."""
    return torch.view_as_real(log_a.resolve_conj()).contiguous() if log_a.is_complex() else log_a.contiguous()


def _transition(log_a: Tensor) -> tuple[Tensor, Tensor]:
    """a = exp(log_a) of a complex log_a as the kernels compute it, as (real, imaginary) planes; for
    the tests of its accuracy (the loops compute it a row at a time and never store it)."""
    return tuple(_kernel().transition(_log_a_plane(log_a)))


class FusedScan(torch.autograd.Function):
    """_GateLoopScan's contract on CPU in the C++ kernel: (q, k [B, T, H, K], v [B, T, H, V] real,
    log_a [B, T, H, K|1] real or complex, S0 [B, H, K, V] or None) -> (o [B, T, H, V], S_T
    [B, H, K, V]), all in one accumulation dtype (float32 or float64), backward in the kernel too,
    which picks its loops by head size (csrc/gateloop_scan.cpp)."""

    @staticmethod
    def forward(ctx, keep_states, q, k, v, log_a, S0):
        """The kernel keeps the state at the end of every 16th step for the backward, which recomputes
        the others a block at a time; keep_states=False (no gradient will be asked for): the final
        state alone."""
        q, k, v, log_a = q.contiguous(), k.contiguous(), v.contiguous(), _log_a_plane(log_a)
        h0r, h0i = _planes(S0)
        o, Sr, *Si = _kernel().forward(q, k, v, log_a, h0r, h0i, keep_states)
        Si = Si[0] if Si else None
        if keep_states:
            ctx.save_for_backward(q, k, v, log_a, Sr, Si, h0r, h0i)
        S_T = Sr[:, -1].clone() if Si is None else torch.complex(Sr[:, -1], Si[:, -1])  # not a view
        return o, S_T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS_T):
        if not ctx.saved_tensors:
            raise RuntimeError("FusedScan: a backward pass after a forward with keep_states=False")
        q, k, v, log_a, Sr, Si, h0r, h0i = ctx.saved_tensors
        dSr, dSi = _planes(dS_T)
        dq, dk, dv, dlog_a, *dh0 = _kernel().backward(q, k, v, log_a, Sr, Si, h0r, h0i, do.contiguous(), dSr, dSi)
        complex_ = Si is not None
        if complex_:
            dlog_a = torch.view_as_complex(dlog_a)
        dS0 = None
        if dh0:
            dS0 = torch.complex(*dh0) if complex_ else dh0[0]
        return None, dq, dk, dv, dlog_a, dS0
