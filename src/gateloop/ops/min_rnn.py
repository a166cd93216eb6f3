"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?", arXiv 2410.01201).

Both are the diagonal recurrence h_t = a_t h_{t-1} + b_t with gates that do not look at h_{t-1}:

    minGRU:  z_t = sigma(k_z),  a_t = 1 - z_t,  b_t = z_t g(h~_t)
    minLSTM: f_t = sigma(k_f), i_t = sigma(k_i),  a_t = f_t / (f_t + i_t),  b_t = i_t / (f_t + i_t) g(h~_t)

g(x) = x + 0.5 for x >= 0, sigma(x) otherwise: the paper's "log-space version" keeps candidates, and
so states started from h0 >= 0, positive. use_g=False is the paper's plain version (g = identity).

    h, final_state = mingru_<mode>(z_logits, h_tilde_pre, *, initial_state=None, output_final_state=False)
    h, final_state = minlstm_<mode>(f_logits, i_logits, h_tilde_pre, *, ...)

Logits and h_tilde_pre: [B, T, D]; initial_state: [B, D] of any sign; h: [B, T, D] in h_tilde_pre's
dtype; final_state: [B, D] in float32 (float64 for float64 inputs), the accumulation dtype.

The scan mode is the paper's log-space parallel scan, log h_t = a*_t + logcumsumexp(log b - a*)_t with
a* = cumsum(log a), run inside chunks of `chunk_size` steps (None: one chunk, the paper's form).
The initial state and each chunk's incoming state enter linearly, h_t = exp(a*_t) h_in + (scan from
zero), which for h0 > 0 equals the paper's log h0 put in front of log b: exact for any sign of h0,
and never log g(h0) (a carried state is already past g).

Why chunks: a* + (x - a*) loses about |a*| * 6e-8 of relative precision in float32, and |a*| grows
with T. One chunk over the sequence with short-memory gates (z near 0.95) is off by 7e-5 at T = 1000
and 3e-4 at T = 4096, against 2e-6 at any T with chunks of 32 steps. Gradients suffer the same
cancellation, in proportion to the chunk size: with logits ~ N(0, 4), float32 gate gradients are off
by about 1e-5 at C = 32 (4e-5 at C = 64, 1e-4 at C = 128). On CPU, C = 32 costs about what one
chunk does.

The blocked mode computes the same recurrence in probability space with the blocked linear scan that
GateLoop's scan mode uses (ops/scan.py: linear_recurrence, a loop inside blocks of about sqrt(T) steps
and across block ends, with a written-out backward). It needs no logs, so no exp/log per element
and no cancellation: on CPU, as an op, about 6x faster than the log-space scan (3x in the layer,
docs/models/min_rnn.md) and more accurate in float32. The log-space scan is the paper's parallel form; the blocked mode is the layers' default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan import linear_recurrence, linear_recurrence_scan

Result = tuple[Tensor, Tensor | None]


def g(x: Tensor) -> Tensor:
    """The paper's positive candidate activation: x + 0.5 for x >= 0, sigma(x) for x < 0."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    """log g(x), finite for every finite x (log sigma(x) = -softplus(-x) for x < 0)."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def _prepare(*inputs: Tensor, initial_state: Tensor | None) -> tuple[list[Tensor], Tensor | None]:
    """Check the [B, T, D] contract and move everything to the accumulation dtype."""
    shape = inputs[0].shape
    if len(shape) != 3 or any(x.shape != shape for x in inputs):
        shapes = [tuple(x.shape) for x in inputs]
        raise ValueError(f"gate logits and h_tilde_pre must all be [B, T, D]; got {shapes}")
    if shape[1] < 1:
        raise ValueError("the sequence must hold at least one step (T >= 1)")
    if any(x.is_complex() for x in inputs):
        raise ValueError("minGRU / minLSTM inputs must be real")
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32
    if initial_state is not None:
        if initial_state.shape != (shape[0], shape[2]):
            raise ValueError(f"initial_state must be [B, D] = [{shape[0]}, {shape[2]}]; "
                             f"got {tuple(initial_state.shape)}")
        initial_state = initial_state.to(dtype)
    return [x.to(dtype) for x in inputs], initial_state


def _recurrent(a: Tensor, b: Tensor, h: Tensor | None, out_dtype, output_final_state) -> Result:
    """The loop h_t = a_t h_{t-1} + b_t over [B, T, D], from h (None: zeros)."""
    h = torch.zeros_like(b[:, 0]) if h is None else h
    hs = []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    return torch.stack(hs, dim=1).to(out_dtype), (h if output_final_state else None)


def mingru_recurrent(z_logits, h_tilde_pre, *, initial_state=None, output_final_state=False,
                     use_g=True) -> Result:
    """Reference: h_t = (1 - z_t) h_{t-1} + z_t g(h~_t), one step at a time, in probability space."""
    (k_z, h_tilde), h0 = _prepare(z_logits, h_tilde_pre, initial_state=initial_state)
    z = torch.sigmoid(k_z)
    cand = g(h_tilde) if use_g else h_tilde
    return _recurrent(1 - z, z * cand, h0, h_tilde_pre.dtype, output_final_state)


def minlstm_recurrent(f_logits, i_logits, h_tilde_pre, *, initial_state=None, output_final_state=False,
                      use_g=True) -> Result:
    """Reference: h_t = f'_t h_{t-1} + i'_t g(h~_t) with f' = f / (f + i), i' = i / (f + i)."""
    (k_f, k_i, h_tilde), h0 = _prepare(f_logits, i_logits, h_tilde_pre, initial_state=initial_state)
    f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
    cand = g(h_tilde) if use_g else h_tilde
    return _recurrent(f / (f + i), i / (f + i) * cand, h0, h_tilde_pre.dtype, output_final_state)


def _absent(dtype: torch.dtype) -> float:
    """The log of a term left out of a scan. Not -inf: exp gives 0 either way, but logcumsumexp's
    gradient at -inf is NaN. A quarter of the lowest float keeps every sum with it finite."""
    return torch.finfo(dtype).min / 4


def _log_scan_from_zero(a_star: Tensor, log_b: Tensor) -> Tensor:
    """h_t = sum_{s<=t} exp(a*_t - a*_s + log b_s) along dim -2 (the paper's Heinsen scan, h0 = 0)."""
    return torch.exp(a_star + torch.logcumsumexp(log_b - a_star, dim=-2))


def _log_space_scan(log_a: Tensor, log_b_parts: list[tuple[int, Tensor]], h0: Tensor | None,
                    chunk_size: int | None) -> Tensor:
    """All states of h_t = a_t h_{t-1} + b_t from h0, b_t = sum over (sign, log_b) parts of
    sign * exp(log_b_t): one part when b > 0, a positive and a negative one otherwise (a negative
    number has no real log). log_a and each log_b: [B, T, D] -> h: [B, T, D]."""
    B, T, D = log_a.shape
    C = T if chunk_size is None else chunk_size
    if C < 1:
        raise ValueError(f"chunk_size must be positive (or None), got {C}")
    N = -(-T // C)
    pad = N * C - T  # padded steps: a = 1, b = 0; they come after every real step of their chunk
    a_star = F.pad(log_a, (0, 0, 0, pad)).view(B, N, C, D).cumsum(2)  # restarts at every chunk
    local = 0  # [B, N, C, D]: each chunk's states, started from zero
    for sign, log_b in log_b_parts:
        log_b = F.pad(log_b, (0, 0, 0, pad), value=_absent(log_b.dtype)).view(B, N, C, D)
        local = local + sign * _log_scan_from_zero(a_star, log_b)
    # Between chunks the state passes linearly: h = exp(a*_local) h_in + local, for any sign of h_in.
    decay = torch.exp(a_star)  # [B, N, C, D], decay from the chunk's start, inclusive
    if N == 1 and h0 is None:
        h = local
    else:
        h_end = linear_recurrence_scan(decay[:, :, -1], local[:, :, -1], h0)  # [B, N, D]
        first = torch.zeros_like(h_end[:, :1]) if h0 is None else h0.unsqueeze(1)
        h_in = torch.cat([first, h_end[:, :-1]], dim=1)  # the state entering each chunk
        h = local + decay * h_in.unsqueeze(2)
    return h.reshape(B, N * C, D)[:, :T]


def _log_candidate_parts(h_tilde: Tensor, use_g: bool) -> list[tuple[int, Tensor]]:
    """The candidate as (sign, log magnitude) parts for _log_space_scan."""
    if use_g:
        return [(1, log_g(h_tilde))]
    # An exact zero goes into both parts, as 1 + h~/2 and 1 - h~/2: values that cancel, slopes that
    # add up to the true slope 1. Left out, its log would be -inf and its gradient 0 * inf = NaN.
    # Every log sees a positive argument (1 where its part is unused), so no NaN flows back.
    one, absent = torch.ones_like(h_tilde), _absent(h_tilde.dtype)
    zero = h_tilde == 0
    pos = torch.where(h_tilde > 0, h_tilde, torch.where(zero, 1 + h_tilde / 2, one))
    neg = torch.where(h_tilde < 0, -h_tilde, torch.where(zero, 1 - h_tilde / 2, one))
    return [(1, torch.where(h_tilde >= 0, torch.log(pos), absent)),
            (-1, torch.where(h_tilde <= 0, torch.log(neg), absent))]


def _finish(h: Tensor, out_dtype, output_final_state) -> Result:
    return h.to(out_dtype), (h[:, -1] if output_final_state else None)


def mingru_scan(z_logits, h_tilde_pre, *, initial_state=None, output_final_state=False, use_g=True,
                chunk_size: int | None = 32) -> Result:
    """Log-space parallel scan: log(1 - z) = -softplus(k_z), log z = -softplus(-k_z)."""
    (k_z, h_tilde), h0 = _prepare(z_logits, h_tilde_pre, initial_state=initial_state)
    parts = [(sign, -F.softplus(-k_z) + log_c) for sign, log_c in _log_candidate_parts(h_tilde, use_g)]
    h = _log_space_scan(-F.softplus(k_z), parts, h0, chunk_size)
    return _finish(h, h_tilde_pre.dtype, output_final_state)


def minlstm_scan(f_logits, i_logits, h_tilde_pre, *, initial_state=None, output_final_state=False,
                 use_g=True, chunk_size: int | None = 32) -> Result:
    """Log-space parallel scan. With d = log i - log f = softplus(-k_f) - softplus(-k_i):
    log f' = -softplus(d), log i' = -softplus(-d), never forming f + i."""
    (k_f, k_i, h_tilde), h0 = _prepare(f_logits, i_logits, h_tilde_pre, initial_state=initial_state)
    d = F.softplus(-k_f) - F.softplus(-k_i)
    parts = [(sign, -F.softplus(-d) + log_c) for sign, log_c in _log_candidate_parts(h_tilde, use_g)]
    h = _log_space_scan(-F.softplus(d), parts, h0, chunk_size)
    return _finish(h, h_tilde_pre.dtype, output_final_state)


def mingru_blocked(z_logits, h_tilde_pre, *, initial_state=None, output_final_state=False,
                   use_g=True) -> Result:
    """The recurrence in probability space, by the blocked scan of ops/scan.py (O(T) work, backward
    written out). No logs, so a candidate of any sign is one term, and a_t = sigma(-k_z) = 1 - z_t
    without cancellation when z_t is near 1."""
    (k_z, h_tilde), h0 = _prepare(z_logits, h_tilde_pre, initial_state=initial_state)
    cand = g(h_tilde) if use_g else h_tilde
    h = linear_recurrence(torch.sigmoid(-k_z), torch.sigmoid(k_z) * cand, h0)
    return _finish(h, h_tilde_pre.dtype, output_final_state)


def minlstm_blocked(f_logits, i_logits, h_tilde_pre, *, initial_state=None, output_final_state=False,
                    use_g=True) -> Result:
    """As mingru_blocked, with f' = sigma(-d) and i' = sigma(d), d = log i - log f (see minlstm_scan):
    f + i, which underflows when both gates are shut, is never formed."""
    (k_f, k_i, h_tilde), h0 = _prepare(f_logits, i_logits, h_tilde_pre, initial_state=initial_state)
    d = F.softplus(-k_f) - F.softplus(-k_i)
    cand = g(h_tilde) if use_g else h_tilde
    h = linear_recurrence(torch.sigmoid(-d), torch.sigmoid(d) * cand, h0)
    return _finish(h, h_tilde_pre.dtype, output_final_state)


MINGRU_MODES = {"recurrent": mingru_recurrent, "scan": mingru_scan, "blocked": mingru_blocked}
MINLSTM_MODES = {"recurrent": minlstm_recurrent, "scan": minlstm_scan, "blocked": minlstm_blocked}
