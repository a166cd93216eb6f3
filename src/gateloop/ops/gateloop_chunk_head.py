"""GateLoop's chunk form for one decay per head (log_a: [B, T, H, 1]) as one autograd Function with
its backward written out: ChunkPerHead, the fast path of gateloop_chunk (ops/gateloop.py), whose
traced form stays beside it as the reference the tests compare it with.

Traced by autograd, the chunk form spends most of its time outside its matrix products: layout
copies of [B, N, H, C, X] views, complex slabs split and stacked, and twice as many elementwise
passes backwards. Here every operand is laid out once as contiguous [G = B H N, C, X] blocks, so
each product is one batched GEMM on contiguous memory, and each elementwise pass is written once.
On CPU the intra-chunk decay (A * W forwards, dA and the decay's gradient backwards) runs in a fused
C++ kernel (csrc/gateloop_chunk.cpp, one pass over the [C, C] blocks each way); the PyTorch planes
below (E, W, Ws) are its fallback and reference (GATELOOP_FUSED=0).

Per chunk (index n) and head, with b_t = rho_t + i theta_t the cumulative log-decay from the chunk's
start (a scalar per step), every quantity a real plane (P = 2 planes for a complex decay, 1 real):

    E_ts = e^{rho_t - rho_s} (s <= t, else 0)   W = E * cos(theta_t - theta_s)   A = q k^T
    o    = (A * W) v + qw S_n                   qw = q * e^{rho_t} [cos theta_t, -sin theta_t]
    U_n  = kw^T v                               kw = k * e^{b_C - b_s} as [Re, Im]
    S_{n+1} = e^{b_C} S_n + U_n                 (S_0 = the initial state; S_n as [Re; Im] rows)

and backwards, with do = dL/do and R_n = dL/dS_{n+1} (run from the end: R = dL/dS_T, then
R <- dS_n|local + conj(e^{b_C}) R): dP = do v^T, dA = dP * W, dq = dA k + (do S_n^T) * weights,
dk = dA^T q + (v R^T) * weights, dv = P^T do + kw R, and the decay's gradient gathered per step from
W, qw, kw and the chunk transition, then summed backwards within the chunk (b is a cumulative sum).
The derivation of the chunk form itself is in ops/README.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .gateloop_fused import chunk_kernel, fused_chunk_available


def _blocks(x: Tensor, B: int, N: int, C: int, H: int) -> Tensor:
    """[B, N C, H, X] -> [B H N, C, X], contiguous: one GEMM-ready block per (batch, head, chunk)."""
    X = x.shape[-1]
    # contiguous: an expanded gradient (stride 0) would reshape into a view that bmm copies per matrix
    return x.reshape(B, N, C, H, X).permute(0, 3, 1, 2, 4).reshape(B * H * N, C, X).contiguous()


def _unblocks(x: Tensor, B: int, N: int, C: int, H: int, T: int) -> Tensor:
    """The inverse of _blocks, cut back to T steps: [B H N, C, X] -> [B, T, H, X]."""
    X = x.shape[-1]
    return x.reshape(B, H, N, C, X).permute(0, 2, 3, 1, 4).reshape(B, N * C, H, X)[:, :T]


def _masked_exp_diff(rho: Tensor) -> Tensor:
    """[G, C] -> [G, C, C]: e^{rho_t - rho_s} for s <= t, exactly 0 above the diagonal (set to -inf
    before the exp, where rho_t - rho_s > 0 could overflow)."""
    C = rho.shape[-1]
    above = torch.ones(C, C, dtype=torch.bool, device=rho.device).triu(1)
    return (rho.unsqueeze(-1) - rho.unsqueeze(-2)).masked_fill_(above, float("-inf")).exp_()


def _phase_products(theta: Tensor) -> tuple[Tensor, Tensor]:
    """cos(theta_t - theta_s) and sin(theta_t - theta_s), [G, C, C], each as one rank-2 product of
    per-step cosines and sines (C cos and sin per block instead of C^2)."""
    c, s = torch.cos(theta), torch.sin(theta)
    cs = torch.stack([c, s], dim=-1)  # [G, C, 2]
    return torch.bmm(cs, cs.transpose(1, 2)), torch.bmm(torch.stack([s, -c], dim=-1), cs.transpose(1, 2))


def _weights(rho: Tensor, theta: Tensor | None, sign: float) -> Tensor:
    """e^rho [cos theta, sign sin theta] ([G, C, 2]) or e^rho ([G, C, 1]) for a real decay."""
    mag = torch.exp(rho)
    if theta is None:
        return mag.unsqueeze(-1)
    return torch.stack([mag * torch.cos(theta), sign * mag * torch.sin(theta)], dim=-1)


def _weighted(x: Tensor, w: Tensor) -> Tensor:
    """x [G, C, K] times each of w's P planes [G, C, P] -> [G, C, P K] (the planes side by side),
    one row-scaled pass per plane (a broadcast [.., P, 1] * [.., 1, K] product is several times slower)."""
    G, C, K = x.shape
    out = x.new_empty(G, C, w.shape[-1] * K)
    for p in range(w.shape[-1]):
        torch.mul(x, w[..., p:p + 1], out=out[..., p * K:(p + 1) * K])
    return out


def _polar_grads(dw: Tensor, w: Tensor, sign: float) -> tuple[Tensor, Tensor | None]:
    """For w = _weights(rho, theta, sign) and dw = dL/dw: (dL/drho, dL/dtheta or None)."""
    if w.shape[-1] == 1:
        return dw[..., 0] * w[..., 0], None
    # d/dtheta takes (w0, w1) = e^rho (cos, sign sin) to e^rho (-sin, sign cos) = (-sign w1, sign w0).
    return (dw * w).sum(-1), sign * (dw[..., 1] * w[..., 0] - dw[..., 0] * w[..., 1])


class ChunkPerHead(torch.autograd.Function):
    """gateloop_chunk's contract for one decay per head: (q, k [B, T, H, K], v [B, T, H, V] real,
    log_a [B, T, H, 1] real or complex, S0 [B, H, K, V] or None, all in one accumulation dtype, C the
    chunk size) -> (o [B, T, H, V], S_T [B, H, K, V]), the backward written out (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, log_a, S0, C: int):
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = -(-T // C)
        pad = N * C - T  # padded steps: log a = 0 and q = k = v = 0, so nothing changes
        if pad:
            q, k, v, log_a = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, log_a))
        qc, kc, vc = (_blocks(x, B, N, C, H) for x in (q, k, v))
        G = qc.shape[0]
        la = _blocks(log_a, B, N, C, H)[..., 0]  # [G, C]
        cplx = la.is_complex()
        rho = (la.real if cplx else la).cumsum(-1)
        theta = la.imag.cumsum(-1) if cplx else None

        # Intra-chunk: (A * W) v with A = q k^T.
        A = torch.bmm(qc, kc.transpose(1, 2))
        fused = fused_chunk_available(A)
        W = Ws = None  # saved for the backward pass by the PyTorch path: W and (complex) Ws = E * sin
        if fused:  # one pass over A (csrc/gateloop_chunk.cpp), the decay recomputed backwards
            AW = chunk_kernel().forward(A, rho, theta)
        else:
            E = _masked_exp_diff(rho)
            if cplx:
                cos_d, sin_d = _phase_products(theta)
                W, Ws = E * cos_d, E.mul_(sin_d)
            else:
                W = E
            AW = A * W
        o = torch.bmm(AW, vc)

        # Each chunk's contribution to the state at its end, and the state passed chunk to chunk.
        Kw = _weights(rho[:, -1:] - rho, None if theta is None else theta[:, -1:] - theta, 1.0)
        P = Kw.shape[-1]
        # One [K, C] @ [C, V] product per plane: as one [P K, C] @ [C, V] product MKL runs at half the rate.
        U = qc.new_empty(P, G, K, V)
        for p in range(P):
            torch.bmm((kc * Kw[..., p:p + 1]).transpose(1, 2), vc, out=U[p])
        U = U.view(P, B * H, N, K, V)
        a_end = _weights(rho[:, -1], None if theta is None else theta[:, -1], 1.0).view(B * H, N, P)
        S_in = _pass_states(a_end, U, S0)  # [B H, N, P, K, V]: the state entering each chunk
        S_T = _step(a_end[:, -1], S_in[:, -1], U[:, :, -1].transpose(0, 1))

        # The carried state's contribution to the outputs: Re(q e^b S_n) as one real product.
        Qw = _weights(rho, theta, -1.0)
        o += torch.bmm(_weighted(qc, Qw), S_in.view(-1, P * K, V))  # (baddbmm loops over the batch on CPU)

        ctx.save_for_backward(qc, kc, vc, A, W, Ws, AW, rho, theta, S_in, a_end)
        ctx.dims = (B, T, H, N, C, S0 is not None, fused)
        S_T = S_T.view(B, H, P, K, V)
        S_T = torch.complex(S_T[:, :, 0], S_T[:, :, 1]) if cplx else S_T[:, :, 0]
        return _unblocks(o, B, N, C, H, T), S_T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS_T):
        qc, kc, vc, A, W, Ws, AW, rho, theta, S_in, a_end = ctx.saved_tensors
        B, T, H, N, C, has_S0, fused = ctx.dims
        G, _, K = qc.shape
        V = vc.shape[-1]
        cplx = theta is not None
        P = 2 if cplx else 1
        if N * C > T:
            do = F.pad(do, (0, 0, 0, 0, 0, N * C - T))
        doc = _blocks(do, B, N, C, H)

        # Intra-chunk. W_ts = Re e^{b_t - b_s}: dW/drho_t = -dW/drho_s = W, dW/dtheta_t = -dW/dtheta_s = -Ws.
        dv = torch.bmm(AW.transpose(1, 2), doc)
        dP = torch.bmm(doc, vc.transpose(1, 2))
        if fused:
            dA, drho, *rest = chunk_kernel().backward(dP, A, rho, theta)  # dA overwrites dP
            dtheta = rest[0] if cplx else None
        else:
            dW = dP * A
            dA = dP.mul_(W)
            g = dW * W
            drho = g.sum(-1) - g.sum(-2)
            dtheta = None
            if cplx:
                g = dW.mul_(Ws)
                dtheta = g.sum(-2) - g.sum(-1)
        dq = torch.bmm(dA, kc)
        dk = torch.bmm(dA.transpose(1, 2), qc)

        # The carried state's contribution to the outputs.
        Qw = _weights(rho, theta, -1.0)
        S_g = S_in.view(G, P, K, V)
        dS_local = qc.new_empty(P, G, K, V)
        dQw = []
        for p in range(P):  # per plane: [C, V] @ [V, K] and [K, C] @ [C, V], MKL's faster shapes
            dqw = torch.bmm(doc, S_g[:, p].transpose(1, 2))
            dq.addcmul_(dqw, Qw[..., p:p + 1])
            dQw.append((dqw * qc).sum(-1))
            torch.bmm((qc * Qw[..., p:p + 1]).transpose(1, 2), doc, out=dS_local[p])
        dS_local = dS_local.view(P, B * H, N, K, V)
        d_r, d_t = _polar_grads(torch.stack(dQw, -1), Qw, -1.0)
        drho += d_r
        if cplx:
            dtheta += d_t

        # The state passed between chunks, backwards: dU_n = R_n = dL/dS_{n+1}.
        dU = torch.empty_like(S_in)
        dU[:, -1] = _planes(dS_T).reshape(B * H, P, K, V)
        a_conj = _conj(a_end)
        for n in range(N - 1, 0, -1):
            _step(a_conj[:, n], dU[:, n], dS_local[:, :, n].transpose(0, 1), out=dU[:, n - 1])
        R = _step(a_conj[:, 0], dU[:, 0], dS_local[:, :, 0].transpose(0, 1))  # dL/dS0
        # dL/db_C = conj(a_end) sum(R_n conj(S_n)) over the state, as (Re, Im) planes.
        if cplx:
            z = torch.stack([(dU * S_in).sum((-3, -2, -1)),
                             (dU[:, :, 1] * S_in[:, :, 0] - dU[:, :, 0] * S_in[:, :, 1]).sum((-2, -1))], dim=-1)
            ar, ai = a_end[..., 0], a_end[..., 1]
            d_end = torch.stack([ar * z[..., 0] + ai * z[..., 1], ar * z[..., 1] - ai * z[..., 0]], -1)
        else:
            d_end = a_end * (dU * S_in).sum((-3, -2, -1)).unsqueeze(-1)
        d_end = d_end.view(G, P)

        # Each chunk's contribution to the state at its end.
        Kw = _weights(rho[:, -1:] - rho, None if theta is None else theta[:, -1:] - theta, 1.0)
        dU_g = dU.view(G, P, K, V)
        dKw = []
        for p in range(P):
            dkw = torch.bmm(vc, dU_g[:, p].transpose(1, 2))
            dk.addcmul_(dkw, Kw[..., p:p + 1])
            dKw.append((dkw * kc).sum(-1))
        dv += torch.bmm(_weighted(kc, Kw), dU.view(G, P * K, V))
        d_phi, d_psi = _polar_grads(torch.stack(dKw, -1), Kw, 1.0)  # w.r.t. rho_C - rho_s, theta_C - theta_s
        drho -= d_phi
        drho[:, -1] += d_phi.sum(-1) + d_end[:, 0]
        if cplx:
            dtheta -= d_psi
            dtheta[:, -1] += d_psi.sum(-1) + d_end[:, 1]

        # b is the cumulative sum of log_a within each chunk: its gradient is the reverse cumsum.
        dla = drho.flip(-1).cumsum(-1).flip(-1)
        if cplx:
            dla = torch.complex(dla, dtheta.flip(-1).cumsum(-1).flip(-1))
        dlog_a = _unblocks(dla.unsqueeze(-1), B, N, C, H, T)
        dS0 = None
        if has_S0:
            dS0 = R.view(B, H, P, K, V)
            dS0 = torch.complex(dS0[:, :, 0], dS0[:, :, 1]) if cplx else dS0[:, :, 0].clone()
        unb = lambda x: _unblocks(x, B, N, C, H, T)  # noqa: E731
        return unb(dq), unb(dk), unb(dv), dlog_a, dS0, None


def _planes(S: Tensor) -> Tensor:
    """[B, H, K, V] real or complex -> [B, H, P, K, V] real planes ([Re, Im] for complex)."""
    if S.is_complex():
        return torch.stack([S.real, S.imag], dim=2)
    return S.unsqueeze(2)


def _conj(a: Tensor) -> Tensor:
    """conj of a [..., P] (Re, Im) pair of planes (a no-op for P = 1)."""
    return a if a.shape[-1] == 1 else torch.stack([a[..., 0], -a[..., 1]], dim=-1)


def _step(a: Tensor, S: Tensor, U: Tensor, out: Tensor | None = None) -> Tensor:
    """a S + U for a [BH, P] (one complex or real scalar per head) and S, U [BH, P, K, V] planes,
    written into out (a fresh tensor when None), which must not overlap S."""
    out = torch.empty_like(U) if out is None else out
    if a.shape[-1] == 1:
        return torch.addcmul(U, a[:, :, None, None], S, out=out)
    ar, ai = a[:, 0, None, None], a[:, 1, None, None]
    Sr, Si = S[:, 0], S[:, 1]
    torch.addcmul(U[:, 0], ar, Sr, out=out[:, 0]).addcmul_(ai, Si, value=-1)
    torch.addcmul(U[:, 1], ar, Si, out=out[:, 1]).addcmul_(ai, Sr)
    return out


def _pass_states(a_end: Tensor, U: Tensor, S0: Tensor | None) -> Tensor:
    """The state entering each chunk, S_0 = S0 (or 0) and S_{n+1} = a_end_n S_n + U_n: [BH, N, P, K, V]
    from U: [P, BH, N, K, V] (the layout its per-plane products write)."""
    N = a_end.shape[1]
    S_in = U.new_empty(U.shape[1], N, U.shape[0], *U.shape[3:])
    if S0 is None:
        S_in[:, 0].zero_()
    else:
        S_in[:, 0] = _planes(S0).reshape(S_in[:, 0].shape)
    for n in range(N - 1):
        _step(a_end[:, n], S_in[:, n], U[:, :, n].transpose(0, 1), out=S_in[:, n + 1])
    return S_in
