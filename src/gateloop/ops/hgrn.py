"""HGRN (Qin et al. 2023): the elementwise gated recurrence h_t = f_t (.) h_{t-1} + x_t.

Two equivalent modes, one contract (the HGRN layer passes x_t = (1 - lambda_t) c_t, log f_t = log lambda_t
+ i theta)::

    h, final_state = hgrn_<mode>(x, log_f, *, initial_state=None, output_final_state=False)

x: [B, T, D] real or complex; log_f: [B, T, D] real (log f_t <= 0) or complex (real part log|f_t|,
imaginary part the phase); initial_state: [B, D] or None. The state is complex when any of the three
is complex. h: [B, T, D], the states h_1 .. h_T, in x's dtype when the state is real, else in the
complex accumulation dtype. The state is kept in float32 / complex64 (float64 / complex128 when x or
log_f is double) whatever the input dtype; final_state: [B, D] in that dtype, or None.

HGRN2 has no op of its own: its per-head matrix state S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T,
y_t = o_t^T S_t is GateLoop's with q = o, k = 1 - f, v = i and log_a = log f (real, per channel), so
layers/hgrn.py calls ops/gateloop.py (gateloop_chunk / gateloop_recurrent) directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .scan import linear_recurrence, linear_recurrence_scan

Result = tuple[Tensor, Tensor | None]


def _prepare(x, log_f, initial_state):
    """Check the contract's shapes; return x, log_f, h0 in the accumulation dtype and the output dtype."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D]; got {tuple(x.shape)}")
    B, T, D = x.shape
    if T < 1:
        raise ValueError("the sequence must hold at least one step (T >= 1)")
    if log_f.shape != x.shape:
        raise ValueError(f"log_f must be [B, T, D] = [{B}, {T}, {D}] like x; got {tuple(log_f.shape)}")
    if initial_state is not None and initial_state.shape != (B, D):
        raise ValueError(f"initial_state must be [B, D] = [{B}, {D}]; got {tuple(initial_state.shape)}")
    double = any(t.dtype in (torch.float64, torch.complex128) for t in (x, log_f))
    real = torch.float64 if double else torch.float32
    cplx = torch.complex128 if double else torch.complex64
    is_complex = x.is_complex() or log_f.is_complex() or (initial_state is not None and initial_state.is_complex())
    state_dtype = cplx if is_complex else real
    out_dtype = state_dtype if is_complex else x.dtype
    log_f = log_f.to(cplx if log_f.is_complex() else real)  # a real f stays real: cheaper products
    h0 = None if initial_state is None else initial_state.to(state_dtype)
    return x.to(state_dtype), log_f, h0, out_dtype


def hgrn_recurrent(x, log_f, *, initial_state=None, output_final_state=False) -> Result:
    """The reference: a plain loop over time, one elementwise update per step. O(T D)."""
    x, log_f, h, out_dtype = _prepare(x, log_f, initial_state)
    f = torch.exp(log_f)
    if h is None:
        h = torch.zeros_like(x[:, 0])
    out = []
    for t in range(x.shape[1]):
        h = f[:, t] * h + x[:, t]
        out.append(h)
    return torch.stack(out, dim=1).to(out_dtype), (h if output_final_state else None)


def hgrn_scan(x, log_f, *, initial_state=None, output_final_state=False) -> Result:
    """Associative scan over (f_t, x_t): ceil(log2 T) parallel steps, O(T D log T) work.

    The scan multiplies transitions |f| <= 1 directly (see ops/scan.py), so nothing overflows.
    """
    x, log_f, h0, out_dtype = _prepare(x, log_f, initial_state)
    h = linear_recurrence_scan(torch.exp(log_f), x, h0)  # h[:, t] = h_t: [B, T, D]
    return h.to(out_dtype), (h[:, -1] if output_final_state else None)


def hgrn_blocked(x, log_f, *, initial_state=None, output_final_state=False) -> Result:
    """The blocked linear scan of ops/scan.py (loops inside blocks, a scan across them) with its
    backward pass written out: O(T D) work, the training default (fewer passes than hgrn_scan)."""
    x, log_f, h0, out_dtype = _prepare(x, log_f, initial_state)
    h = linear_recurrence(torch.exp(log_f), x, h0)
    return h.to(out_dtype), (h[:, -1] if output_final_state else None)


HGRN_MODES = {"recurrent": hgrn_recurrent, "scan": hgrn_scan, "blocked": hgrn_blocked}
