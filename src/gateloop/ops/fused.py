"""A fused CPU kernel for GateLoop's max-headed scan (K = V = 1, the paper's default layer).

In PyTorch the max-headed scan is a dozen elementwise passes over [B, T, H] slabs (the transition,
k v, the blocked recurrence, the output; twice as many backwards), and on CPU each pass costs more
in memory traffic and allocation than in arithmetic. csrc/max_headed_scan.cpp does the recurrence
and its output in one loop over time, and the adjoint recurrence with every gradient in another
(the equations are at its top). Only the transition a = exp(log_a) is left to PyTorch, whose
exp / cos / sin are vectorised.

The kernel is compiled on first use with torch.utils.cpp_extension (a C++ compiler and ninja are
needed; about half a minute, once: the build is cached, see build_directory). Where it cannot be built, or on
other devices, or with GATELOOP_FUSED=0 in the environment, gateloop_scan uses the PyTorch path
(_GateLoopScan in ops/gateloop.py), which is also the reference the tests compare this one with.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).parent / "csrc" / "max_headed_scan.cpp"
NAME = "gateloop_max_headed_scan"


def build_directory() -> Path:
    """Where the compiled kernel is cached: $GATELOOP_CACHE (default ~/.cache/gateloop), per torch
    version, so that upgrading torch rebuilds it."""
    root = Path(os.environ.get("GATELOOP_CACHE", Path.home() / ".cache" / "gateloop"))
    return root / "kernels" / f"torch-{torch.__version__}"


@functools.cache
def _kernel():
    """The compiled module, or None (with one warning saying why) where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        where = build_directory()
        where.mkdir(parents=True, exist_ok=True)
        if not (where / f"{NAME}.so").exists():
            print(f"gateloop: compiling the fused CPU scan into {where} (once, about 30 s)", file=sys.stderr,
                  flush=True)
        return load(NAME, [str(SOURCE)], extra_cflags=["-O3"], build_directory=str(where), verbose=False)
    except Exception as e:  # noqa: BLE001  no compiler, no ninja, a read-only cache: use PyTorch
        reason = next(iter(str(e).strip().splitlines()), type(e).__name__)[:200]
        warnings.warn(f"gateloop: the fused CPU scan could not be built ({reason}); using the PyTorch "
                      "path (set GATELOOP_FUSED=0 to skip the attempt)", RuntimeWarning, stacklevel=3)
        return None


@torch.compiler.disable  # under torch.compile, decide eagerly (Dynamo cannot trace the build)
def fused_scan_available(x: Tensor) -> bool:
    """Whether MaxHeadedScan can run on x's device (CPU, kernel built, not switched off)."""
    return x.device.type == "cpu" and os.environ.get("GATELOOP_FUSED", "1") != "0" and _kernel() is not None


def _planes(x: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(real plane, imaginary plane or None), contiguous; (None, None) for None."""
    if x is None:
        return None, None
    if x.is_complex():
        return x.real.contiguous(), x.imag.contiguous()
    return x.contiguous(), None


class MaxHeadedScan(torch.autograd.Function):
    """_GateLoopScan's contract for K = V = 1: (q, k, v [B, T, H, 1] real, log_a [B, T, H, 1] real
    or complex, S0 [B, H, 1, 1] or None) -> (o [B, T, H, 1], S_T [B, H, 1, 1]), all in one
    accumulation dtype (float32 or float64), with the backward in the kernel too."""

    @staticmethod
    def forward(ctx, q, k, v, log_a, S0):
        q, k, v = (x[..., 0].contiguous() for x in (q, k, v))
        log_a = log_a[..., 0]
        if log_a.is_complex():  # in place where possible: fresh pages cost more than the arithmetic
            mag = torch.exp(log_a.real)
            ar, ai = torch.cos(log_a.imag).mul_(mag), torch.sin(log_a.imag).mul_(mag)
        else:
            ar, ai = torch.exp(log_a).contiguous(), None
        h0r, h0i = _planes(None if S0 is None else S0[..., 0, 0])
        o, Sr, *Si = _kernel().forward(q, k, v, ar, ai, h0r, h0i)
        Si = Si[0] if Si else None
        ctx.save_for_backward(q, k, v, ar, ai, Sr, Si, h0r, h0i)
        ctx.complex = log_a.is_complex()
        S_T = Sr[:, -1].clone() if Si is None else torch.complex(Sr[:, -1], Si[:, -1])  # not a view of Sr
        return o.unsqueeze(-1), S_T[..., None, None]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS_T):
        q, k, v, ar, ai, Sr, Si, h0r, h0i = ctx.saved_tensors
        dSr, dSi = _planes(dS_T[..., 0, 0])
        dq, dk, dv, dlr, *rest = _kernel().backward(q, k, v, ar, ai, Sr, Si, h0r, h0i,
                                                     do[..., 0].contiguous(), dSr, dSi)
        dli = rest.pop(0) if ctx.complex else None
        dlog_a = dlr if dli is None else torch.complex(dlr, dli)
        dS0 = None
        if h0r is not None:
            dS0 = rest[0] if not ctx.complex else torch.complex(rest[0], rest[1])
            dS0 = dS0[..., None, None]
        return dq[..., None], dk[..., None], dv[..., None], dlog_a[..., None], dS0
