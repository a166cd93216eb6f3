"""GateLoop (Katsch 2023): S_t = diag(a_t) S_{t-1} + k_t v_t^T,  o_t = Re(q_t^T S_t).

Four equivalent modes, one contract (see ops/README.md for the derivations and numerics):

    o, final_state = gateloop_<mode>(q, k, v, log_a, *, initial_state=None, output_final_state=False)

q, k: [B, T, H, K] real; v: [B, T, H, V] real; log_a: [B, T, H, K] or [B, T, H, 1] (one decay per
head), real (log-magnitude <= 0) or complex (imaginary part = phase); initial_state: [B, H, K, V],
complex when log_a is complex. o: [B, T, H, V] in v's dtype. The state is kept in float32 / complex64
(float64 / complex128 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan import linear_recurrence_loop, linear_recurrence_scan

Result = tuple[Tensor, Tensor | None]


def _prepare(q, k, v, log_a, initial_state):
    """Check the contract's shapes and move everything to the accumulation dtype."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K]; got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, K = q.shape
    if T < 1:
        raise ValueError("the sequence must hold at least one step (T >= 1)")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V]; got {tuple(v.shape)}")
    if log_a.shape not in ((B, T, H, K), (B, T, H, 1)):
        raise ValueError(f"log_a must be [B, T, H, K] or [B, T, H, 1]; got {tuple(log_a.shape)}")
    if q.is_complex() or k.is_complex() or v.is_complex():
        raise ValueError("q, k and v must be real; only log_a (and the state) may be complex")
    real = torch.float64 if q.dtype == torch.float64 else torch.float32
    cplx = torch.complex128 if real == torch.float64 else torch.complex64
    state_dtype = cplx if log_a.is_complex() else real
    if initial_state is not None:
        if initial_state.shape != (B, H, K, v.shape[-1]):
            raise ValueError(f"initial_state must be [B, H, K, V] = [{B}, {H}, {K}, {v.shape[-1]}]; "
                             f"got {tuple(initial_state.shape)}")
        if initial_state.is_complex() and not log_a.is_complex():
            raise ValueError("a complex initial_state needs a complex log_a")
        initial_state = initial_state.to(state_dtype)
    return q.to(real), k.to(real), v.to(real), log_a.to(state_dtype), initial_state


def _re_matmul(x: Tensor, y: Tensor) -> Tensor:
    """Re(x @ y) for real or complex operands, as one real matrix product."""
    if not x.is_complex():
        return x @ y.real
    if not y.is_complex():
        return x.real @ y
    return torch.cat([x.real, x.imag], dim=-1) @ torch.cat([y.real, -y.imag], dim=-2)


def _matmul_real_rhs(x: Tensor, y: Tensor) -> Tensor:
    """x @ y for complex or real x and real y, without promoting y to complex."""
    if not x.is_complex():
        return x @ y
    return torch.complex(x.real @ y, x.imag @ y)


def _segsum(x: Tensor) -> Tensor:
    """[..., T] -> [..., T, T] with out[..., t, s] = sum_{s < j <= t} x_j (and 0 where s > t).

    Summing only the terms between s and t, rather than differencing two long cumulative sums,
    keeps full precision for nearby (t, s): those carry the weight of the result.
    """
    T = x.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    x = x.unsqueeze(-1).expand(*x.shape, T).masked_fill(~strict, 0)  # [..., t=j, s]
    return x.cumsum(dim=-2)


def _causal_re_decay(seg: Tensor) -> Tensor:
    """Re(exp(seg)) on and below the diagonal, 0 above, from the output of _segsum.

    Only the real part is ever needed (q and k are real), and exp(re) * cos(im) is far cheaper than
    a complex exp. seg is 0 above the diagonal, so nothing overflows and gradients stay finite.
    """
    T = seg.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    decay = torch.exp(seg.real) * torch.cos(seg.imag) if seg.is_complex() else torch.exp(seg)
    return torch.where(causal, decay, 0)


def _local_re_decay(b: Tensor) -> Tensor:
    """Re e^{b_t - b_s} for s <= t and 0 above, from within-chunk cumulative logs b: [..., C, K|1]
    -> [..., K|1, C, C]. Differences of local sums are precise because |b| stays within one chunk;
    the upper triangle (where b_t - b_s > 0 could overflow) is set to -inf before the exp, whose
    gradient there is exp(-inf) = 0: nothing inf or NaN reaches the backward pass."""
    b = b.transpose(-1, -2)
    C = b.shape[-1]
    above = torch.ones(C, C, dtype=torch.bool, device=b.device).triu(1)
    rho = b.real[..., :, None] - b.real[..., None, :]
    decay = torch.exp(rho.masked_fill(above, float("-inf")))
    if b.is_complex():
        decay = decay * torch.cos(b.imag[..., :, None] - b.imag[..., None, :])
    return decay


def gateloop_recurrent(q, k, v, log_a, *, initial_state=None, output_final_state=False) -> Result:
    """The reference: a plain loop over time, one state update per step. O(T K V)."""
    dtype = v.dtype
    q, k, v, log_a, S = _prepare(q, k, v, log_a, initial_state)
    B, T, H, K = q.shape
    a = torch.exp(log_a).unsqueeze(-1)  # [B, T, H, K|1, 1]
    if S is None:
        S = q.new_zeros(B, H, K, v.shape[-1], dtype=a.dtype)
    out = []
    for q_t, k_t, v_t, a_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), a.unbind(1)):
        S = a_t * S + k_t[..., :, None] * v_t[..., None, :]
        out.append((q_t[..., :, None] * S).sum(-2).real)
    return torch.stack(out, dim=1).to(dtype), (S if output_final_state else None)


def gateloop_scan(q, k, v, log_a, *, initial_state=None, output_final_state=False) -> Result:
    """Associative scan over (a_t, k_t v_t^T): log2(T) parallel steps, every state materialised."""
    dtype = v.dtype
    q, k, v, log_a, S0 = _prepare(q, k, v, log_a, initial_state)
    a = torch.exp(log_a).unsqueeze(-1)  # [B, T, H, K|1, 1]
    kv = (k.unsqueeze(-1) * v.unsqueeze(-2)).to(a.dtype)  # [B, T, H, K, V]
    S = linear_recurrence_scan(a, kv, S0)  # S[:, t] = S_t
    o = (q.unsqueeze(-1) * S).sum(-2).real
    return o.to(dtype), (S[:, -1] if output_final_state else None)


def gateloop_attention(q, k, v, log_a, *, initial_state=None, output_final_state=False) -> Result:
    """The surrogate attention: o_t = sum_{s<=t} Re(q_t^T diag(e^{L_t - L_s}) k_s) v_s. O(T^2).

    Decays are built from per-pair sums (never from e^{L_t} / e^{L_s}, which overflows) and the
    phase from a float64 cumulative sum reduced mod 2 pi, so long sequences keep their precision.
    Memory is O(T^2) per head and decay channel.
    """
    dtype = v.dtype
    q, k, v, log_a, S0 = _prepare(q, k, v, log_a, initial_state)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    log_a = log_a.permute(0, 2, 3, 1)  # [B, H, K|1, T]
    rho = log_a.real
    seg, theta = _segsum(rho), None  # [B, H, K|1, T, T]
    if log_a.is_complex():
        theta = torch.remainder(log_a.imag.double().cumsum(-1), 2 * math.pi).to(rho.dtype)
        seg = torch.complex(seg, theta.unsqueeze(-1) - theta.unsqueeze(-2))
    W = _causal_re_decay(seg)  # Re e^{L_t - L_s}
    if log_a.shape[2] == 1:
        scores = (q @ k.transpose(-1, -2)) * W[:, :, 0]
    else:
        scores = torch.einsum("bhtk,bhsk,bhkts->bhts", q, k, W)
    o = scores @ v  # [B, H, T, V]

    final_state = None
    if S0 is not None or output_final_state:
        L = rho.cumsum(-1) if theta is None else torch.complex(rho.cumsum(-1), theta)
        decay_from_start = torch.exp(L).transpose(-1, -2)  # [B, H, T, K|1]
    if S0 is not None:
        o = o + _re_matmul(q * decay_from_start, S0)
    if output_final_state:
        # Row T-1 of the decay matrix, now complex: e^{L_T - L_s} for every s.
        last = _segsum(rho)[..., -1, :]
        if theta is not None:
            last = torch.polar(torch.exp(last), theta[..., -1:] - theta)
        else:
            last = torch.exp(last)
        final_state = _matmul_real_rhs((k * last.transpose(-1, -2)).transpose(-1, -2), v)
        if S0 is not None:
            final_state = final_state + decay_from_start[:, :, -1].unsqueeze(-1) * S0
    return o.transpose(1, 2).to(dtype), final_state


def _default_chunk_size(K: int, per_head: bool) -> int:
    """Per-channel decays build a [C, C, K] decay tensor per chunk (elementwise work), so they get
    short chunks; one decay per head builds [C, C] and its intra-chunk part is matrix products,
    which pay off once K is large enough to amortise them."""
    if not per_head:
        return 8
    return 64 if K >= 32 else 16


def gateloop_chunk(q, k, v, log_a, *, initial_state=None, output_final_state=False,
                   chunk_size: int | None = None) -> Result:
    """Chunked form, the training default: surrogate attention inside chunks of C steps, state
    passing between them. O(T C K + T K V), made of matrix products.

    chunk_size defaults by shape (see _default_chunk_size): the intra-chunk part costs O(C) per
    token and the state passing O(K V / C), so small key dims want small chunks.
    """
    dtype = v.dtype
    q, k, v, log_a, S0 = _prepare(q, k, v, log_a, initial_state)
    B, T, H, K = q.shape
    per_head = log_a.shape[-1] == 1
    C = chunk_size or _default_chunk_size(K, per_head)
    if C < 1:
        raise ValueError(f"chunk_size must be positive, got {C}")
    N = -(-T // C)
    pad = N * C - T  # padded steps have a = 1 and k = v = 0: they change neither outputs nor state

    def chunked(x):  # [B, T, H, X] -> [B, H, N, C, X]
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.reshape(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    q, k, v, log_a = chunked(q), chunked(k), chunked(v), chunked(log_a)
    b = log_a.cumsum(dim=3)  # log of the decay from the chunk's start to step c, inclusive

    # Intra-chunk: the surrogate attention restricted to each chunk.
    W = _local_re_decay(b)  # [B, H, N, K|1, C, C]
    if per_head:
        scores = (q @ k.transpose(-1, -2)) * W[..., 0, :, :]
    else:
        # Elementwise over [C, C, K], written out: einsum here turned into one tiny matmul per
        # (batch, head, chunk), each with its own copies.
        scores = (W.permute(0, 1, 2, 4, 5, 3) * q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1)
    o = scores @ v  # [B, H, N, C, V]

    # Inter-chunk: each chunk's contribution to the state at its end, then a scan over chunks.
    chunk_log_a = b[:, :, :, -1:]  # [B, H, N, 1, K|1]
    k_to_end = k * torch.exp(chunk_log_a - b)  # exponent <= 0 in real part: no overflow
    U = _matmul_real_rhs(k_to_end.transpose(-1, -2), v)  # [B, H, N, K, V]
    a_chunk = torch.exp(chunk_log_a).transpose(-1, -2)  # [B, H, N, K|1, 1]
    S_end = linear_recurrence_loop(a_chunk.transpose(1, 2), U.transpose(1, 2), S0).transpose(1, 2)
    first = torch.zeros_like(S_end[:, :, :1]) if S0 is None else S0.unsqueeze(2)
    S_start = torch.cat([first, S_end[:, :, :-1]], dim=2)  # the state entering each chunk
    o = o + _re_matmul(q * torch.exp(b), S_start)

    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, -1)[:, :T]
    return o.to(dtype), (S_end[:, :, -1] if output_final_state else None)
