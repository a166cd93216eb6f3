"""Forgetting Attention (FoX, Lin et al. 2025) with Adaptive Computation Pruning (ACP, Lin et al. 2025).

    o_i = sum_j softmax_j( scale q_i . k_j + D_ij ) v_j,   D_ij = c_i - c_j for j <= i, -inf for j > i,
    c_i = sum_{l <= i} log f_l   (log f_l <= 0: the forget gates, one per head and step)

Two paths, one contract; the queries are the LAST T of S + T positions (S cached keys come first,
S = 0 without a cache):

    o = forgetting_attention_naive(q, k, v, log_f, *, c_past=None, scale=None)      the reference
    o = forgetting_attention(q, k, v, log_f, *, c_past=None, scale=None,
                             log_pruning_tolerance=None, block_size=64, return_stats=False)

q: [B, T, H, K]; k: [B, S + T, H, K]; v: [B, S + T, H, V]; log_f: [B, T, H], the gates of the T new
positions; c_past: [B, S, H], the cumulative log-gates of the cached keys (any common offset: only
differences matter), required when S > 0. `cumulative_log_f(log_f, c_past)` gives the [B, S + T, H]
array a caller keeps for the next call. o: [B, T, H, V] in v's dtype; scale defaults to K^-1/2.

Numerics: c is summed in float64 whatever the inputs (T * H numbers, cheap): a float32 running sum
at |c| ~ 1e4 carries an absolute error ~1e-3 into every difference c_i - c_j, the nearby ones that
hold the softmax weight included. The reference subtracts the float64 sums; the blockwise path
re-centres c on each query block before casting, so D_ij keeps the relative precision of |D_ij|.
Everything else accumulates in float32 (float64 stays float64), with autocast disabled inside.
The blockwise path also sends weights below e^-80 of a row's largest to exactly 0 (see _exp_).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def _check(q, k, v, log_f, c_past) -> int:
    """Validate the contract's shapes; return S, the number of cached keys."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, *]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, K = q.shape
    Tk = k.shape[1]
    if T < 1 or Tk < T:
        raise ValueError(f"need 1 <= T (queries, {T}) <= S + T (keys, {Tk})")
    if k.shape != (B, Tk, H, K) or v.shape[:3] != (B, Tk, H):
        raise ValueError(f"k must be [B, S+T, H, K] = [{B}, {Tk}, {H}, {K}] and v [B, S+T, H, V]; "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if log_f.shape != (B, T, H):
        raise ValueError(f"log_f must be [B, T, H] = [{B}, {T}, {H}]; got {tuple(log_f.shape)}")
    S = Tk - T
    if S > 0 and (c_past is None or c_past.shape != (B, S, H)):
        got = None if c_past is None else tuple(c_past.shape)
        raise ValueError(f"with S = {S} cached keys, c_past must be [B, S, H] = [{B}, {S}, {H}]; got {got}")
    if S == 0 and c_past is not None and c_past.shape[1] != 0:
        raise ValueError(f"c_past holds {c_past.shape[1]} positions but k holds no cached keys")
    return S


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def cumulative_log_f(log_f: Tensor, c_past: Tensor | None = None) -> Tensor:
    """c for the cached and new positions: [B, S + T, H] in float64, continuing c_past [B, S, H]."""
    c = log_f.to(torch.float64).cumsum(1)
    if c_past is None or c_past.shape[1] == 0:
        return c
    c_past = c_past.to(torch.float64)
    return torch.cat([c_past, c_past[:, -1:] + c], dim=1)


def forgetting_attention_naive(q, k, v, log_f, *, c_past=None, scale=None) -> Tensor:
    """The reference: the full [T, S + T] score matrix per head, masked and softmaxed. O(T (S+T)) memory."""
    S = _check(q, k, v, log_f, c_past)
    T, Tk, acc = q.shape[1], k.shape[1], _acc_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    c = cumulative_log_f(log_f, c_past)  # [B, S+T, H]
    D = (c[:, S:, None, :] - c[:, None, :, :]).permute(0, 3, 1, 2)  # [B, H, T, S+T]: float64 differences
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.einsum("bthk,bshk->bhts", q.to(acc), k.to(acc)) * scale + D.to(acc)
        causal = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(S)  # query i is position S + i
        p = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
        o = torch.einsum("bhts,bshv->bthv", p, v.to(acc))
    return o.to(v.dtype)


class ACPStats(NamedTuple):
    """What the blockwise op pruned. Tiles are block_size x block_size on the grid of absolute
    positions (query block b holds positions b * block_size ...), query blocks from S // block_size."""

    pruned_fraction: float  # of the causal (batch, head, query block, key block) tiles; 0 without ACP
    kept: Tensor  # [B, H, n_query_blocks, n_key_blocks] bool: the tiles computed
    threshold: Tensor | None  # delta [B, H] (float64), None without ACP


def _acp_kept(qb, kb, cb, b0, log_tol, n_keys) -> tuple[Tensor, Tensor | None]:
    """Tiles to compute, kept [BH, nq, nk] bool, and the ACP threshold delta [BH] (float64).

    U = max|q| max|k| bounds |q_i . k_j| (q comes scaled). A row's softmax denominator is at least
    e^{-U} (its own key has D = 0) and each of its <= n_keys pruned terms at most e^{U + delta}, so
    with delta = -(2U + log n_keys) + log eps the pruned mass per row is <= eps. A tile is pruned when
    its largest D, max c over its query rows - min c over its keys, is below delta; max / min make
    this hold for any log_f, monotone or not. Block tensors as in _Blockwise.
    """
    nk, BH = cb.shape[:2]
    nq = nk - b0
    causal = torch.ones(nq, nk, dtype=torch.bool, device=cb.device).tril(b0)  # key block j <= b0 + i
    kept = causal.expand(BH, nq, nk)
    if log_tol is None:
        return kept, None
    U = qb.norm(dim=-1).amax((0, 2)).double() * kb.norm(dim=-1).amax((0, 2)).double()  # [BH]
    delta = -(2 * U + math.log(n_keys)) + log_tol
    bound = cb[b0:].amax(-1).t()[:, :, None] - cb.amin(-1).t()[:, None, :]  # [BH, nq, nk]
    diagonal = causal.triu(b0)  # key block j == b0 + i: never pruned (it holds the row's own key)
    return kept & ((bound >= delta[:, None, None]) | diagonal), delta


def _plan(kept: Tensor, b0: int) -> list[tuple[int, object, object]]:
    """The tiles to visit, one key-block diagonal d at a time (query block i meets key block
    b0 + i - d), all query blocks of a diagonal at once: O(n_blocks) Python steps, not O(n^2).

    Each entry is (d, q_where, k_where), indices into block-major [n_blocks, BH, ...] tensors: two
    slices when every (query block, batch-head) of the diagonal is kept (the tiles are then views),
    else (block, bh) index-tensor pairs of the kept tiles (gathered copies). No query block and no
    key block repeats within a diagonal, so indexed writes accumulate correctly. One host sync.
    """
    kept_cpu, plan = kept.cpu(), []
    nk = kept.shape[2]
    for d in range(nk):
        i0 = max(0, d - b0)
        diag = torch.diagonal(kept_cpu, offset=b0 - d, dim1=1, dim2=2)  # [BH, nq - i0]: (i, b0 + i - d)
        if diag.all():
            n = diag.shape[1]
            plan.append((d, slice(i0, i0 + n), slice(b0 + i0 - d, b0 + i0 - d + n)))
        elif diag.any():
            bh, i = (x.to(kept.device) for x in diag.nonzero(as_tuple=True))
            i = i + i0
            plan.append((d, (i, bh), (i + b0 - d, bh)))
    return plan


def _tile_scores(qb, kb, cb, off, qw, kw, d):
    """Scores of the tiles of one diagonal, up to a constant per row: [n, BH | N, bs, bs].

    softmax_j(q_i.k_j + c_i - c_j) does not depend on c_i (constant along the row), so only
    -c_j is added, taken relative to the query block's last position off_i (float64) before the
    cast: it then carries the relative precision of D_ij itself. qb is already scaled. -inf above
    the diagonal when d = 0. Works in place on the fresh product: every pass over a tile counts.
    """
    s = qb[qw] @ kb[kw].transpose(-1, -2)
    s.sub_((cb[kw] - off[qw][..., None]).to(s.dtype)[..., None, :])
    if d == 0:
        bs = s.shape[-1]
        s.masked_fill_(~torch.ones(bs, bs, dtype=torch.bool, device=s.device).tril(), -math.inf)
    return s


def _exp_(x: Tensor) -> Tensor:
    """exp in place, with every x < -80 sent to exactly 0 (x <= 0 holds the scores minus a row max).

    e^-80 = 2e-35 of the row's largest weight is far below float32 (and float64) resolution, but
    e^-88 .. e^-104 are float32 subnormals, which x86 computes tens of times slower: with strong
    forgetting whole tiles fall there, and the unpruned op ran 2.6x slower without this.
    """
    return torch.nn.functional.threshold_(x, -80.0, -math.inf).exp_()


def _accumulate(x: Tensor, where, a: Tensor, b: Tensor, beta=None) -> None:
    """x[where] = beta * x[where] + a @ b, in place when `where` is a slice (a view of x)."""
    t = x[where]
    if beta is not None:
        t.mul_(beta)
    t.view(-1, *t.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    if not isinstance(where, slice):
        x[where] = t


class _Blockwise(torch.autograd.Function):
    """Flash-style forward (online softmax over key blocks) and backward (probabilities recomputed
    from the saved row log-sum-exp). Block-major tensors, so that a run of blocks is one contiguous
    view: qb [nq, BH, bs, K] (scaled), kb [nk, BH, bs, K], vb [nk, BH, bs, V], cb [nk, BH, bs]
    float64. Only the tiles in the plan are touched, in both directions."""

    @staticmethod
    def forward(ctx, qb, kb, vb, cb, plan, b0):
        off = cb[b0:, :, -1]  # [nq, BH]: c at each query block's last position
        # Running max, denominator and numerator. The d = 0 tiles come first for every query block and
        # hold each row's own key, so m is finite before any update could compute -inf - (-inf).
        m = torch.full(off.shape + qb.shape[2:3], -math.inf, dtype=qb.dtype, device=qb.device)
        l, o = torch.zeros_like(m), qb.new_zeros(qb.shape[:3] + vb.shape[3:])
        for d, qw, kw in plan:
            s = _tile_scores(qb, kb, cb, off, qw, kw, d)
            m_old = m[qw]
            m_new = torch.maximum(m_old, s.amax(-1))
            p, alpha = _exp_(s.sub_(m_new[..., None])), torch.exp(m_old - m_new)
            l[qw] = l[qw] * alpha + p.sum(-1)
            _accumulate(o, qw, p, vb[kw], beta=alpha[..., None])
            m[qw] = m_new
        o = o / l[..., None]
        lse = m + torch.log(l)  # [nq, BH, bs], in the same row-shifted frame as the scores
        ctx.save_for_backward(qb, kb, vb, cb, o, lse)
        ctx.plan, ctx.b0 = plan, b0
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        qb, kb, vb, cb, o, lse = ctx.saved_tensors
        off = cb[ctx.b0:, :, -1]
        with torch.autocast(qb.device.type, enabled=False):
            do = do.contiguous()
            row = (do * o).sum(-1)  # [nq, BH, bs]: sum_j P_ij dP_ij
            dq, dk, dv = torch.zeros_like(qb), torch.zeros_like(kb), torch.zeros_like(vb)
            dc = torch.zeros(cb.shape, dtype=qb.dtype, device=cb.device)
            for d, qw, kw in ctx.plan:
                p = _exp_(_tile_scores(qb, kb, cb, off, qw, kw, d).sub_(lse[qw][..., None]))
                do_t = do[qw]
                _accumulate(dv, kw, p.transpose(-1, -2), do_t)
                ds = (do_t @ vb[kw].transpose(-1, -2)).sub_(row[qw][..., None]).mul_(p)  # dL/d(score)
                _accumulate(dq, qw, ds, kb[kw])
                _accumulate(dk, kw, ds.transpose(-1, -2), qb[qw])
                # D_ij = c_i - c_j; the c_i part sums to zero over each row (softmax is shift-invariant).
                dc[kw] -= ds.sum(-2)
        return dq, dk, dv, dc.to(cb.dtype), None, None


def forgetting_attention(q, k, v, log_f, *, c_past=None, scale=None, log_pruning_tolerance=None,
                         block_size: int = 64, return_stats: bool = False):
    """Blockwise, flash-style Forgetting Attention: never forms the [T, S+T] matrix, in either pass.

    Positions are cut into blocks of block_size on one absolute grid for queries and keys; query
    rows before S (in the first query block) and past the end are padding whose outputs are dropped.
    log_pruning_tolerance: None (exact) or log eps < 0 (the paper recommends -10): skip every tile
    whose scores are provably so low that each row loses at most eps of its softmax mass (ACP, see
    _acp_kept); the output then moves by at most 2 eps max|v| per element. With return_stats,
    returns (o, ACPStats). Not twice differentiable (the backward is hand-written).
    """
    S = _check(q, k, v, log_f, c_past)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if log_pruning_tolerance is not None and not (-math.inf < log_pruning_tolerance < 0):
        raise ValueError(f"log_pruning_tolerance must be None or a finite log eps < 0, got {log_pruning_tolerance}")
    B, T, H, K = q.shape
    Tk, acc, bs = k.shape[1], _acc_dtype(q), block_size
    scale = K ** -0.5 if scale is None else scale
    nk = -(-Tk // bs)
    b0, front, back = S // bs, S % bs, nk * bs - Tk  # first query block; padding before / after

    def blocks(x):  # [B, n * bs, H, *X] -> [n, B * H, bs, *X]
        x = x.unflatten(1, (-1, bs)).movedim(3, 1)  # [B, H, n, bs, *X]
        return x.movedim(2, 0).flatten(1, 2).contiguous()

    def pad(x, before):  # zeros before and after, to whole blocks
        return torch.nn.functional.pad(x, (0, 0, 0, 0, before, back))

    c = cumulative_log_f(log_f, c_past)  # [B, S+T, H] float64
    cb = blocks(torch.cat([c, c[:, -1:].expand(B, back, H)], dim=1))  # padded keys: c constant (unseen)
    with torch.autocast(q.device.type, enabled=False):
        qb = blocks(pad(q.to(acc) * scale, front))
        kb, vb = blocks(pad(k.to(acc), 0)), blocks(pad(v.to(acc), 0))
        with torch.no_grad():
            kept, delta = _acp_kept(qb, kb, cb, b0, log_pruning_tolerance, Tk)
        ob = _Blockwise.apply(qb, kb, vb, cb, _plan(kept, b0), b0)  # [nq, BH, bs, V]
    o = ob.unflatten(1, (B, H)).permute(1, 0, 3, 2, 4).flatten(1, 2)  # [B, nq * bs, H, V]
    o = o[:, front:front + T].to(v.dtype)
    if not return_stats:
        return o
    n_causal = kept.shape[0] * (b0 * (nk - b0) + (nk - b0) * (nk - b0 + 1) // 2)
    stats = ACPStats(pruned_fraction=1 - kept.sum().item() / n_causal,
                     kept=kept.unflatten(0, (B, H)),
                     threshold=None if delta is None else delta.view(B, H))
    return o, stats
