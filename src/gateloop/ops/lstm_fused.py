"""A fused CPU kernel for the LSTM loop (csrc/lstm_loop.cpp).

The LSTM is non-linear in its state, so its loop over time cannot be parallelised; what costs on a
CPU is the work around each step's small matrix product: in PyTorch a step is a dozen elementwise
launches on [B, N] slices, forwards and again backwards, each paying the dispatcher and a pass over
memory. The kernel does each step as one product and one pass over [B, N] that computes every gate,
the cell and the output (backwards: every pre-activation's gradient and the carried dL/dc), for all
nine variants. In float32 the per-step products are the kernel's own, with the recurrent matrix
packed once per call: a BLAS call per step repacks it every time, which cost more than the product.
The weight gradients stay in PyTorch (ops/lstm.py: _weight_grads), as a few big products after the
loop.

The kernel is compiled on first use (ops/cpp.py). Where it cannot be built, or on other devices, or
with GATELOOP_FUSED=0, lstm_bptt runs the same loops in PyTorch (ops/lstm.py: _forward_loop and
_backward_loop), which are also the reference the tests compare the kernel with.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .cpp import CSRC, build, fused_allowed

SOURCE = CSRC / "lstm_loop.cpp"
NAME = "gateloop_lstm_kernels"


@functools.cache
def _kernel():
    """The compiled module, or None where it cannot be built (ops/cpp.py)."""
    return build(NAME, SOURCE, "LSTM kernel", native=True)  # its row loops are SIMD vectors


@torch.compiler.disable  # under torch.compile, decide eagerly (Dynamo cannot trace the build)
def fused_lstm_available(x: Tensor) -> bool:
    """Whether the kernel can run on x (a CPU tensor, the kernel built, not switched off)."""
    return fused_allowed(x) and _kernel() is not None


def variant_spec(gates: str, peepholes: str, cifg: bool, niaf: bool, noaf: bool, fgr: bool) -> list[int]:
    """The kernel's description of a variant: the block of each gate i, f, z, o in the pre-activations
    and the row of each peephole i, f, o in p (-1 where absent), then the four switches."""
    return ([gates.find(k) for k in "ifzo"] + [peepholes.find(k) for k in "ifo"]
            + [int(cifg), int(niaf), int(noaf), int(fgr)])


def contiguous(t: Tensor | None) -> Tensor | None:
    """t as the kernel reads it (contiguous), or None."""
    return None if t is None else t.contiguous()


def fused_forward(spec: list[int], x_proj: Tensor, R: Tensor, p: Tensor | None, R_gates: Tensor | None,
                  y: Tensor, c: Tensor, *prev: Tensor) -> list[Tensor]:
    """(A [B, T, G, N] every step's gate activations, C, Y [B, T, N], c_T[, FGR's gates at T])."""
    return _kernel().forward(x_proj.contiguous(), R.contiguous(), contiguous(p), contiguous(R_gates),
                             y.contiguous(), c.contiguous(), contiguous(prev[0] if prev else None), spec)


def fused_backward(spec: list[int], dY: Tensor, dy: Tensor, dc: Tensor, *dprev: Tensor, R: Tensor,
                   p: Tensor | None, R_gates: Tensor | None, A: Tensor, C: Tensor, c0: Tensor) -> list[Tensor]:
    """(dA [B, T, G, N] the pre-activations' gradients, dL/dy_0, dL/dc_0[, FGR's dL/d gates_0])."""
    return _kernel().backward(dY.contiguous(), dy.contiguous(), dc.contiguous(),
                              contiguous(dprev[0] if dprev else None), R.contiguous(), contiguous(p),
                              contiguous(R_gates), A, C, c0, spec)
