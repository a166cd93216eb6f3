"""GateLoop (Katsch 2023): S_t = diag(a_t) S_{t-1} + k_t v_t^T,  o_t = Re(q_t^T S_t).

Four equivalent modes, one contract (see ops/README.md for the derivations and numerics):

    o, final_state = gateloop_<mode>(q, k, v, log_a, *, initial_state=None, output_final_state=False)

q, k: [B, T, H, K] real; v: [B, T, H, V] real; log_a: [B, T, H, K] or [B, T, H, 1] (one decay per
head), real (log-magnitude <= 0) or complex (imaginary part = phase); initial_state: [B, H, K, V],
complex when log_a is complex. o: [B, T, H, V] in v's dtype. The state is kept in float32 / complex64
(float64 / complex128 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .gateloop_chunk_head import ChunkPerHead
from .gateloop_fused import FusedScan, fused_scan_available
from .scan import linear_recurrence, scan_blocked

Result = tuple[Tensor, Tensor | None]


def _accumulate_in_float32(op):
    """Run op with autocast off: its products must accumulate in float32 (complex64), not in the
    autocast dtype; _prepare upcasts the inputs and the output is cast back to v's dtype."""
    @functools.wraps(op)
    def wrapper(q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return op(q, *args, **kwargs)
    return wrapper


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


@_accumulate_in_float32
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


class _GateLoopScan(torch.autograd.Function):
    """The scan mode as one Function: S = scan(exp(log_a), k v^T, S0), o = Re(q^T S), with the
    backward written out rather than traced through complex elementwise ops.

    With do = dL/do, r_t = dL/dS_t accumulated backwards (r_t = q_t do_t^T + conj(a_{t+1}) r_{t+1},
    plus dL/dS_T at the end): dq = Re(S) do, d(k v^T) = Re(r), dlog_a = sum(r conj(S_{t-1})) conj(a)
    (summed over V, and over K for one decay per head), dS0 = conj(a_1) r_1. Shapes: q, k [B, T, H, K],
    v [B, T, H, V], log_a [B, T, H, K|1], S0 [B, H, K, V] or None, all in the accumulation dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, log_a, S0):
        B, T, H, K = q.shape
        V = v.shape[-1]
        ctx.shapes = (K, V, log_a.shape[-1])
        if K == V == 1:  # max-headed: everything elementwise on [B, T, H]; no size-1 reductions
            q, k, v, log_a = q[..., 0], k[..., 0], v[..., 0], log_a[..., 0]
            S0 = None if S0 is None else S0[..., 0, 0]
            a = _exp(log_a)
            S = scan_blocked(a, k * v, S0)
            o = (q * (S.real if S.is_complex() else S)).unsqueeze(-1)
        else:
            a = _exp(log_a).unsqueeze(-1)  # [B, T, H, K|1, 1]
            kv = k.unsqueeze(-1) * v.unsqueeze(-2)  # [B, T, H, K, V], real
            S = scan_blocked(a, kv, S0)  # S[:, t] = S_t
            o = (q.unsqueeze(-1) * (S.real if S.is_complex() else S)).sum(-2)  # Re(q^T S), q real
        ctx.save_for_backward(q, k, v, a, S, S0)
        S_T = S[:, -1].clone()
        return o, (S_T.view(B, H, 1, 1) if K == V == 1 else S_T)

    @staticmethod
    def backward(ctx, do, dS_T):
        q, k, v, a, S, S0 = ctx.saved_tensors
        K, V, Kd = ctx.shapes
        S_re = S.real if S.is_complex() else S
        flat = K == V == 1
        if flat:
            do, dS_T = do[..., 0], dS_T[..., 0, 0]
            dq = S_re * do
            g = q * do
        else:
            dq = (S_re * do.unsqueeze(-2)).sum(-1)
            g = q.unsqueeze(-1) * do.unsqueeze(-2)  # dL/dS_t through o_t, real
        a_next = torch.cat([a[:, 1:].conj(), torch.ones_like(a[:, :1])], dim=1)
        r = scan_blocked(a_next, g, dS_T, reverse=True)  # dL/dS_t through everything
        r_re = r.real if r.is_complex() else r
        first = torch.zeros_like(S[:, :1]) if S0 is None else S0.unsqueeze(1)
        S_prev = torch.cat([first, S[:, :-1]], dim=1)
        if flat:
            dk, dv = r_re * v, r_re * k
            dlog_a = r * (S_prev * a).conj()
            dq, dk, dv, dlog_a = dq[..., None], dk[..., None], dv[..., None], dlog_a[..., None]
        else:
            dk = (r_re * v.unsqueeze(-2)).sum(-1)
            dv = (r_re * k.unsqueeze(-1)).sum(-2)
            da = (r * S_prev.conj()).sum(-1, keepdim=True)  # [B, T, H, K, 1]
            if Kd == 1:
                da = da.sum(-2, keepdim=True)
            dlog_a = (da * a.conj()).squeeze(-1)
        dS0 = None
        if S0 is not None:
            dS0 = a[:, 0].conj() * r[:, 0]
            dS0 = dS0[..., None, None] if flat else dS0
        return dq, dk, dv, dlog_a, dS0


@_accumulate_in_float32
def gateloop_scan(q, k, v, log_a, *, initial_state=None, output_final_state=False) -> Result:
    """The scan over (a_t, k_t v_t^T), every state materialised: O(T K V) memory.

    The paper states it as a log-depth associative scan (linear_recurrence_scan, O(T log T) work);
    this runs the same recurrence as a blocked scan with O(T) work (scan.scan_blocked) inside one
    autograd Function with a hand-written backward (_GateLoopScan): on CPU several times faster. It
    is the fast path for the max-headed layer (K = V = 1), where every product is elementwise. On CPU
    fused C++ kernels (ops/gateloop_fused.py) replace it, for every head size, where they can be built.
    """
    dtype = v.dtype
    q, k, v, log_a, S0 = _prepare(q, k, v, log_a, initial_state)
    if fused_scan_available(q):
        keep_states = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, log_a, S0))
        o, S_T = FusedScan.apply(keep_states, q, k, v, log_a, S0)
    else:
        o, S_T = _GateLoopScan.apply(q, k, v, log_a, S0)
    return o.to(dtype), (S_T if output_final_state else None)


@_accumulate_in_float32
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


SUB_CHUNK = 16  # per-channel decays: the diagonal blocks computed elementwise inside a chunk


def _causal_re_decay_local(rho: Tensor, theta: Tensor | None) -> Tensor:
    """Re e^{b_t - b_s} for s <= t, 0 above, from local cumulative logs b = rho + i theta
    [..., C, K|1] -> [..., K|1, C, C]. The upper triangle (where b_t - b_s > 0 could overflow) is set
    to -inf before the exp, whose gradient there is exp(-inf) = 0: no inf or NaN reaches backward."""
    C = rho.shape[-2]
    above = torch.ones(C, C, dtype=torch.bool, device=rho.device).triu(1)
    rho = rho.transpose(-1, -2)
    W = torch.exp((rho.unsqueeze(-1) - rho.unsqueeze(-2)).masked_fill(above, float("-inf")))
    if theta is not None:
        th = theta.transpose(-1, -2)
        W = W * torch.cos(th.unsqueeze(-1) - th.unsqueeze(-2))
    return W


def _intra_chunk_per_channel(q, k, v, rho, theta, c: int) -> Tensor:
    """The intra-chunk output for per-channel decays, q, k, rho, theta: [B, N, H, C, K], v: [..., V].

    The chunk is cut into n = C / c sub-chunks. Pairs inside one sub-chunk use the elementwise
    [c, c, K] decay. Pairs (t in sub-chunk i, s in an earlier one) factor through r_i, the step just
    before sub-chunk i: e^{b_t - b_s} = e^{b_t - b_r} e^{b_r - b_s}, both exponents <= 0 in real part
    for any input (no overflow), so they are one real matrix product of key dim 2K per sub-chunk.
    """
    B, N, H, C, K = q.shape
    n = C // c
    sub = lambda x: x.reshape(B, N, H, n, c, x.shape[-1])  # noqa: E731  [.., n, c, X]
    o_diag = ((_causal_re_decay_local(sub(rho), None if theta is None else sub(theta)).permute(0, 1, 2, 3, 5, 6, 4)
               * sub(q).unsqueeze(-2) * sub(k).unsqueeze(-3)).sum(-1)) @ sub(v)  # [B, N, H, n, c, V]
    if n == 1:
        return o_diag.reshape(B, N, H, C, -1)
    # r_i = i * c - 1 for i >= 1; sub-chunk 0 has no earlier keys (a dummy reference, fully masked).
    ref = torch.arange(n, device=q.device) * c - 1
    ref_rho = rho[..., ref.clamp(min=0), :]  # [B, N, H, n, K]
    earlier = torch.arange(C, device=q.device)[None, :] <= ref[:, None]  # [n, C]: s <= r_i
    to_ref = (ref_rho.unsqueeze(-2) - rho.unsqueeze(-3)).masked_fill(~earlier[..., None], float("-inf"))
    from_ref = sub(rho) - ref_rho.unsqueeze(-2)  # [B, N, H, n, c, K], <= 0
    if theta is None:
        q_ref, k_ref = sub(q) * torch.exp(from_ref), k.unsqueeze(-3) * torch.exp(to_ref)
    else:
        ref_theta = theta[..., ref.clamp(min=0), :]
        # Re(q e^{x} . k e^{y}) = [q e^Re x cos, q e^Re x sin] . [k e^Re y cos, -k e^Re y sin]
        q_ref = (sub(q).unsqueeze(-2) * _re_im_weights(from_ref, sub(theta) - ref_theta.unsqueeze(-2), 1.0))
        k_ref = (k.unsqueeze(-3).unsqueeze(-2)
                 * _re_im_weights(to_ref, ref_theta.unsqueeze(-2) - theta.unsqueeze(-3), -1.0))
        q_ref, k_ref = q_ref.flatten(-2), k_ref.flatten(-2)  # [.., c, 2K], [.., C, 2K]
    o_off = (q_ref @ k_ref.transpose(-1, -2)) @ v.unsqueeze(3)  # [B, N, H, n, c, V]
    return (o_diag + o_off).reshape(B, N, H, C, -1)


def default_chunk_size(K: int, per_head: bool) -> int:
    """The intra-chunk part costs O(C (K + V)) per token in matrix products (plus O(C K), at most
    O(SUB_CHUNK K), elementwise for per-channel decays), the state passing O(K V) per chunk
    boundary: one decay per head gets chunks of 64 once K is large enough to amortise the products."""
    if not per_head:
        return 8  # measured fastest on CPU (docs/performance.md); larger C saves state memory
    return 64 if K >= 32 else 16


def _exp(x: Tensor) -> Tensor:
    """exp for real or complex x; complex as e^re (cos im + i sin im) from real, vectorised
    kernels: on CPU several times faster than torch.exp or torch.polar on complex tensors."""
    if not x.is_complex():
        return torch.exp(x)
    mag, im = torch.exp(x.real), x.imag
    return torch.complex(mag * torch.cos(im), mag * torch.sin(im))


def _re_im_weights(rho: Tensor, theta: Tensor | None, sign: float) -> Tensor:
    """e^rho [cos theta, sign * sin theta] stacked on a new dim -2 ([..., 2, X]), or e^rho alone
    ([..., 1, X]) for real decays: the weights that turn a complex decay into real matrix products."""
    mag = torch.exp(rho)
    if theta is None:
        return mag.unsqueeze(-2)
    return torch.stack([mag * torch.cos(theta), sign * mag * torch.sin(theta)], dim=-2)


@_accumulate_in_float32
def gateloop_chunk(q, k, v, log_a, *, initial_state=None, output_final_state=False,
                   chunk_size: int | None = None) -> Result:
    """Chunked form, the training default: surrogate attention inside chunks of C steps, state
    passing between them. O(T C K + T K V), made of real matrix products.

    chunk_size defaults by shape (see default_chunk_size): the intra-chunk part costs O(C) per
    token and the state passing O(K V / C), so small key dims want small chunks. With one decay per
    head this runs ChunkPerHead (ops/gateloop_chunk_head.py: contiguous blocks, batched GEMMs, the
    backward written out); with a decay per key channel, and as the reference for ChunkPerHead,
    gateloop_chunk_traced (the same maths traced by autograd).
    """
    if log_a.dim() == 0 or log_a.shape[-1] != 1:
        return gateloop_chunk_traced(q, k, v, log_a, initial_state=initial_state,
                                     output_final_state=output_final_state, chunk_size=chunk_size)
    dtype = v.dtype
    q, k, v, log_a, S0 = _prepare(q, k, v, log_a, initial_state)
    C = default_chunk_size(q.shape[-1], True) if chunk_size is None else chunk_size
    if C < 1:
        raise ValueError(f"chunk_size must be positive, got {C}")
    o, S_T = _run_chunk_per_head(q, k, v, log_a, S0, C)
    return o.to(dtype), (S_T if output_final_state else None)


# Opaque to torch.compile: Dynamo cannot trace the C++ kernel's call and, tracing the rest, AOT autograd
# mistakes the views of the Function's in-place state planes (an assertion error); eager inside a
# compiled graph, it is what the compiled graph would have run anyway (products and one kernel).
@torch.compiler.disable
def _run_chunk_per_head(q, k, v, log_a, S0, C):
    return ChunkPerHead.apply(q, k, v, log_a, S0, C)


@_accumulate_in_float32
def gateloop_chunk_traced(q, k, v, log_a, *, initial_state=None, output_final_state=False,
                          chunk_size: int | None = None) -> Result:
    """gateloop_chunk's maths as plain tensor code, differentiated by autograd: the path for a decay
    per key channel, and the reference ChunkPerHead is tested against.

    Every product is real. With b = log of the decay from the chunk's start (rho + i theta) and
    S = S_re + i S_im the complex state, Re(q^T e^b S) = [q e^rho cos theta, -q e^rho sin theta]
    @ [S_re; S_im] (one real product with key dim 2K), and a chunk's contribution to the next state,
    sum_s e^{b_C - b_s} k_s v_s^T, is [k e^.. cos; k e^.. sin]^T @ v read as [Re; Im]. The state
    itself passes between chunks by the blocked linear recurrence of scan.py (hand-written backward).
    """
    dtype = v.dtype
    q, k, v, log_a, S0 = _prepare(q, k, v, log_a, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    per_head = log_a.shape[-1] == 1
    is_complex = log_a.is_complex()
    C = default_chunk_size(K, per_head) if chunk_size is None else chunk_size
    if C < 1:
        raise ValueError(f"chunk_size must be positive, got {C}")
    N = -(-T // C)
    pad = N * C - T  # padded steps have a = 1 and k = v = 0: they change neither outputs nor state

    def chunked(x):  # [B, T, H, X] -> [B, N, H, C, X]: chunk index at dim 1, the recurrence's time dim
        x = F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
        return x.reshape(B, N, C, H, x.shape[-1]).transpose(2, 3)

    q, k, v, log_a = chunked(q), chunked(k), chunked(v), chunked(log_a)
    # Local cumulative logs, from the chunk's start to step c inclusive: |b| stays within one chunk.
    b = log_a.cumsum(dim=3)  # [B, N, H, C, K|1]
    rho, theta = (b.real, b.imag) if is_complex else (b, None)

    # Intra-chunk: the surrogate attention restricted to each chunk, Re e^{b_t - b_s} masked to s <= t.
    if per_head:
        scores = (q @ k.transpose(-1, -2)) * _causal_re_decay_local(rho, theta)[..., 0, :, :]  # [B, N, H, C, C]
        o = scores @ v  # [B, N, H, C, V]
    else:
        o = _intra_chunk_per_channel(q, k, v, rho, theta, math.gcd(C, SUB_CHUNK))

    # Inter-chunk: each chunk's contribution to the state at its end (exponents <= 0 in real part),
    # as real [Re; Im] halves, then the recurrence over chunks.
    to_end = _re_im_weights(rho[..., -1:, :] - rho, None if theta is None else theta[..., -1:, :] - theta, 1.0)
    P = to_end.shape[-2]  # 2 for complex decays, 1 for real
    k_to_end = (k.unsqueeze(-2) * to_end).reshape(B, N, H, C, P * K)  # [.., C, (re|im) K]
    U = (k_to_end.transpose(-1, -2) @ v).view(B, N, H, P, K, V)
    U = torch.complex(U[:, :, :, 0], U[:, :, :, 1]) if is_complex else U[:, :, :, 0]  # [B, N, H, K, V]
    a_chunk = _exp(b[..., -1, :]).unsqueeze(-1)  # [B, N, H, K|1, 1]
    S_end = linear_recurrence(a_chunk, U, S0)  # [B, N, H, K, V]: the state at each chunk's end
    first = torch.zeros_like(S_end[:, :1]) if S0 is None else S0.unsqueeze(1)
    S_start = torch.cat([first, S_end[:, :-1]], dim=1)  # the state entering each chunk
    if is_complex:
        S_start = torch.stack([S_start.real, S_start.imag], dim=-3)  # [B, N, H, 2, K, V]
    q_from_start = (q.unsqueeze(-2) * _re_im_weights(rho, theta, -1.0)).reshape(B, N, H, C, P * K)
    o = o + q_from_start @ S_start.reshape(B, N, H, P * K, V)

    o = o.transpose(2, 3).reshape(B, N * C, H, V)[:, :T]
    return o.to(dtype), (S_end[:, -1] if output_final_state else None)
