"""Miras (Behrouz et al. 2025): a deep memory trained at test time, chunk by chunk (docs/models/miras.md
for the equations and every choice the paper left open). EXPERIMENTAL.

The memory, per (batch element, head), maps a key dim Dh to the same Dh (the residual needs K = V):

    M(W; x) = x + LN(gelu(s x W1) W2)      W1: [Dh, F], W2: [F, Dh], LN without affine, s = 1 (Memora: F)

Each rule keeps its own parameterisation P of W (the "accumulator") and updates it with per-channel
retention alpha_t and learning rate eta_t (channel i scales row i of W1 and column i of W2):

    moneta: P = A,     A_t = alpha_t A_{t-1} - eta_t G_t,             W = A / ||A||_nu^(q-2)  (per matrix,
                       ||A||_nu = (sum |A|^q + nu^q)^(1/q): a floor that keeps W bounded)
    yaad:   P = W,     W_t = alpha_t W_{t-1} - eta_t G_t
    memora: P = log W, log W_t = log_softmax(alpha_t log W_{t-1} - eta_t G_t)   over the hidden axis F

G_t = grad_W l(M(W_s; k_t) - v_t) is taken at the chunk-start weights W_s ("mini-batch" gradient
descent), with l = (1/p)||e||_p^p (moneta), the per-coordinate Huber loss with threshold delta_t
(yaad), or (1/2)||e||^2 (memora). Retrieval reads every earlier token, read before write:
o_t = M(W_{t-1}; q_t), W_{t-1} from the running accumulator (Moneta: over the chunk-start normaliser).
Chunks sit at absolute positions; a state carries the chunk-start accumulator ("w1", "w2"), the
running one ("u1", "u2": the sufficient statistic of the tokens of the unfinished chunk) and
"n", the number of those tokens (a Python int, 0 <= n < chunk_size).

    o, state = miras_<mode>(q, k, v, log_alpha, eta, rule=..., initial_state={"w1", "w2"[, "u1", "u2", "n"]},
                            delta=None, chunk_size=16, p=3.0, q_retention=4.0, output_final_state=False)

q, k, v, log_alpha (<= 0), eta (>= 0), delta (> 0, yaad only): [B, T, H, Dh]; w1: [B, H, Dh, F],
w2: [B, H, F, Dh]. o: [B, T, H, Dh] in v's dtype. Everything is computed in float32 (float64 stays
float64) with autocast off.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

RULES = ("moneta", "yaad", "memora")
LN_EPS = 1e-5
MONETA_NORM_FLOOR = 0.05  # nu: Moneta's l_q norm never falls below it (see _normaliser)
MemoryState = dict  # {"w1", "w2", "u1", "u2": Tensor, "n": int}


def _normaliser(a: Tensor, q_retention: float) -> Tensor:
    """Moneta's ||A||_q^(q-2) per matrix, with the norm smoothed by a floor: (sum |A|^q + nu^q)^(1/q).
    Without the floor, retention shrinking A makes W = A / ||A||_q^(q-2) grow as ||A||^(3-q) and the
    sum underflows (W = inf / NaN after ~3,700 tokens at q = 4); with it ||W||_q <= nu^(3-q) / 2^((q-2)/q)
    for q >= 3 and an emptied accumulator reads as an empty memory."""
    power = a.square().square() if q_retention == 4 else a.abs().pow(q_retention)  # the same; 4 is faster
    norm_q = power.sum((-2, -1), keepdim=True) + MONETA_NORM_FLOOR ** q_retention
    return norm_q.pow((q_retention - 2) / q_retention)


def memory_weights(rule: str, w1: Tensor, w2: Tensor, q_retention: float = 4.0) -> tuple[Tensor, Tensor]:
    """The memory weights W of the update rule from their accumulator P (see the module docstring)."""
    if rule == "moneta":
        return w1 / _normaliser(w1, q_retention), w2 / _normaliser(w2, q_retention)
    if rule == "memora":
        return w1.exp(), w2.exp()
    return w1, w2


def read_weights(rule: str, state: MemoryState, q_retention: float = 4.0) -> tuple[Tensor, Tensor]:
    """The weights a token reads: the running accumulators u (every earlier token written, gradients
    taken at the chunk start); Moneta divides by the chunk-start normaliser (linear in u inside a
    chunk, so the chunked form has a closed form). At chunk size 1 this is W_{t-1} exactly."""
    u1, u2 = state.get("u1", state["w1"]), state.get("u2", state["w2"])
    if rule == "moneta":
        return u1 / _normaliser(state["w1"], q_retention), u2 / _normaliser(state["w2"], q_retention)
    return memory_weights(rule, u1, u2, q_retention)


def input_scale(rule: str, hidden: int) -> float:
    """s in M: Memora's W1 rows are distributions over F (entries ~ 1/F); s = F makes s W1 average 1, so
    pre-activations stay O(|x|) rather than O(|x| / F)."""
    return float(hidden) if rule == "memora" else 1.0


def memory_forward(W1: Tensor, W2: Tensor, x: Tensor, scale: float = 1.0) -> Tensor:
    """M(W; x) = x + LN(gelu(scale x W1) W2). W1: [B, H, Dh, F], W2: [B, H, F, Dh], x: [B, H, L, Dh]."""
    u = F.gelu(scale * (x @ W1)) @ W2
    return x + F.layer_norm(u, u.shape[-1:], eps=LN_EPS)


def _error_grad(rule: str, e: Tensor, delta: Tensor | None, p: float) -> Tensor:
    """dl/de for the rule's attentional bias, e = M(k) - v: [..., Dh]."""
    if rule == "moneta":
        return torch.sign(e) * e.abs().pow(p - 1)
    if rule == "yaad":  # Huber per coordinate: e inside [-delta, delta], delta * sign(e) outside
        return torch.where(e.abs() <= delta, e, delta * torch.sign(e))
    return e


def _token_terms(rule, W1, W2, k, v, delta, p, scale, norms=None) -> tuple[Tensor, Tensor, Tensor]:
    """Per token j of a segment, at the chunk-start weights W: h_j = gelu(s k_j W1) [.., L, F] and the
    backpropagated errors d1_j = dl/dz_j [.., L, F], d2_j = dl/du_j [.., L, Dh], so that
    grad_W1 l_j = s k_j^T d1_j and grad_W2 l_j = h_j^T d2_j (rank one: never materialised).
    norms = (n1, n2), scalars per (b, h): the weights are W1 / n1, W2 / n2 (Moneta passes its
    accumulators and normalisers, and the divisions land on the small [L, .] products instead of
    the full matrices)."""
    n1, n2 = norms if norms is not None else (1.0, 1.0)
    z = scale * (k @ W1) / n1  # [B, H, L, F]
    h = F.gelu(z)
    u = (h @ W2) / n2  # [B, H, L, Dh]
    uc = u - u.mean(-1, keepdim=True)
    r = torch.rsqrt(uc.pow(2).mean(-1, keepdim=True) + LN_EPS)
    n = uc * r
    g = _error_grad(rule, k + n - v, delta, p)
    d2 = r * (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True))  # dl/du through LN
    gelu_prime = 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    d1 = (d2 @ W2.transpose(-1, -2)) / n2 * gelu_prime  # dl/dz: [B, H, L, F]
    return h, d1, d2


def _gradient_sum(k, h, d1, d2, c, scale) -> tuple[Tensor, Tensor]:
    """sum_j c_j (.) grad_W l_j: ([B, H, Dh, F], [B, H, F, Dh]); c_j [B, H, L, Dh] weights channel i
    of token j's gradient (row i of dW1, column i of dW2)."""
    # The small [L, Dh] operand is transposed into a contiguous copy: a transposed view on the left of
    # a batched product with inner size L runs ~1.5x slower on CPU (measured), and the copy is tiny.
    return (k * (scale * c)).transpose(-1, -2).contiguous() @ d1, h.transpose(-1, -2) @ (d2 * c)


def _read_segment_masked(rule, q, k, h, d1, d2, eta, la, state, q_retention, scale) -> Tensor:
    """The reference form of _read_segment: the decays as one masked [L, L, Dh] tensor per (b, h), which
    holds for any retention (no overflow: masked before exp), at the cost of 5-D elementwise work.
    Token t reads P_{t-1} = exp(cx_t) (.) u - sum_{j<t} c_tj (.) G_j (u: the running accumulators
    before the segment, cx_t: the log-retention of the segment's tokens before t, c_tj = eta_j times
    the retention between j and t)."""
    if rule == "memora":  # the running log-weights themselves
        u1, u2 = state.get("u1", state["w1"]), state.get("u2", state["w2"])
    else:
        u1, u2 = read_weights(rule, state, q_retention)  # [B, H, Dh, F], [B, H, F, Dh]
    ci = la.cumsum(2)  # inclusive log-retention up to j: [B, H, L, Dh]
    cx = ci - la  # exclusive: up to (not including) t
    L = q.shape[2]
    before = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)[..., None]  # j < t
    # E[t, j, i] = prod_{j < l < t} alpha_l,i for j < t, else 0 (masked before exp: no overflow).
    E = torch.where(before, cx.unsqueeze(3) - ci.unsqueeze(2), -math.inf).exp()  # [B, H, L, L, Dh]
    ek, ed = E * (eta * k).unsqueeze(2), E * (eta * d2).unsqueeze(2)
    keep = cx.exp()
    if rule == "memora":  # the read weights are the softmax of the running log-weights
        P1 = keep.unsqueeze(-1) * u1.unsqueeze(2) - scale * torch.einsum("bhtji,bhjf->bhtif", ek, d1)
        hq = F.gelu(scale * torch.einsum("bhti,bhtif->bhtf", q, P1.softmax(-1)))
        P2 = keep.unsqueeze(-2) * u2.unsqueeze(2) - torch.einsum("bhjf,bhtji->bhtfi", h, ed)
        u = torch.einsum("bhtf,bhtfi->bhti", hq, P2.softmax(-2))
    else:  # W_{t-1} = P_{t-1} (Moneta: u was divided by the chunk-start normaliser already)
        n1 = _normaliser(state["w1"], q_retention) if rule == "moneta" else 1.0
        n2 = _normaliser(state["w2"], q_retention) if rule == "moneta" else 1.0
        S = torch.einsum("bhti,bhtji->bhtj", q, ek)  # q_t . (c_tj (.) k_j)
        hq = F.gelu(scale * ((q * keep) @ u1 - scale * (S @ d1) / n1))
        A = hq @ h.transpose(-1, -2)  # h(q_t) . h(k_j): [B, H, L, L]
        u = (hq @ u2) * keep - torch.einsum("bhtj,bhtji->bhti", A, ed) / n2
    return q + F.layer_norm(u, u.shape[-1:], eps=LN_EPS)


# The factored read multiplies exp(cx_t) by exp(-ci_j); both stay finite and normal (float32 too) while
# a segment's log-retention per channel stays above -FACTOR_LIMIT. Beyond it: the masked form.
FACTOR_LIMIT = 30.0


def _read_segment(rule, q, k, h, d1, d2, eta, la, state, q_retention, scale, norms=None) -> Tensor:
    """Outputs of a segment, token t reading P_{t-1} (see _read_segment_masked, the reference). For Yaad
    and Moneta the decay between j and t factors as exp(cx_t) exp(-ci_j), so every decay-weighted sum
    over j < t is a strictly-lower-triangular [L, L] matrix product, like gated linear attention's
    intra-chunk part; they read P (over the chunk-start normaliser, norms) and are linear in it, so
    M(P_{t-1}; q_t) has a closed form. Falls back to the masked form where exp(-ci) could overflow.
    Memora always takes the masked form: its softmax is not linear, its per-token weights [L, Dh, F]
    are materialised either way, and the masked einsum was the faster of the two (measured against
    exclusive cumulative sums of the factored terms)."""
    ci = la.cumsum(2)  # inclusive log-retention up to j: [B, H, L, Dh]
    if rule == "memora" or -ci[:, :, -1].min() > FACTOR_LIMIT:
        return _read_segment_masked(rule, q, k, h, d1, d2, eta, la, state, q_retention, scale)
    u1, u2 = state.get("u1", state["w1"]), state.get("u2", state["w2"])  # accumulators, not yet weights
    keep = (ci - la).exp()  # exp(cx_t): the retention of the segment's tokens before t
    grow = (-ci).exp()  # exp(-ci_j)
    n1, n2 = norms if norms is not None else (1.0, 1.0)  # W = P / n (Moneta; n is a scalar per (b, h))
    L = q.shape[2]
    before = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)  # j < t
    qk = q * keep
    S = (qk @ (eta * k * grow).transpose(-1, -2)).masked_fill(~before, 0.0)  # q_t . (c_tj (.) k_j)
    hq = F.gelu(scale * (qk @ u1 - scale * (S @ d1)) / n1)
    A = (hq @ h.transpose(-1, -2)).masked_fill(~before, 0.0)  # h(q_t) . h(k_j), j < t: [B, H, L, L]
    u = keep * (hq @ u2 - A @ (eta * d2 * grow)) / n2
    return q + F.layer_norm(u, u.shape[-1:], eps=LN_EPS)


def _retain(rule: str, a: Tensor, u1: Tensor, u2: Tensor, G1: Tensor, G2: Tensor,
            sign: float = -1.0) -> tuple[Tensor, Tensor]:
    """P <- a (.) P - G with per-channel a: [B, H, Dh] (rows of W1, columns of W2); Memora renormalises.
    (sign=1.0: G already holds the negated step, P <- a (.) P + G.)
    Memora's alpha is constant along the hidden axis, so renormalising once per segment equals
    renormalising after every token (softmax ignores the constants it would have removed)."""
    u1 = torch.add(a.unsqueeze(-1) * u1, G1, alpha=sign)
    u2 = torch.add(a.unsqueeze(-2) * u2, G2, alpha=sign)
    if rule == "memora":
        return torch.log_softmax(u1, dim=-1), torch.log_softmax(u2, dim=-2)
    return u1, u2


def _prepare(q, k, v, log_alpha, eta, delta, rule, initial_state, chunk_size, p, q_retention):
    """Check the contract, move to the compute dtype and to [B, H, T, Dh]; unpack the state."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if q.dim() != 4 or any(x.shape != q.shape for x in (k, v, log_alpha, eta)):
        raise ValueError("q, k, v, log_alpha and eta must all be [B, T, H, Dh]; got "
                         f"{[tuple(x.shape) for x in (q, k, v, log_alpha, eta)]}")
    if (rule == "yaad") != (delta is not None) or (delta is not None and delta.shape != q.shape):
        raise ValueError("delta [B, T, H, Dh] is required by rule 'yaad' and only by it")
    if q.shape[1] < 1:
        raise ValueError("the sequence must hold at least one step (T >= 1)")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not p >= 2 or not q_retention >= 2:
        raise ValueError(f"need p >= 2 and q_retention >= 2 (smooth inner gradients), got {p}, {q_retention}")
    if not isinstance(initial_state, dict) or not {"w1", "w2"} <= initial_state.keys():
        raise ValueError("initial_state must be a dict holding at least the memory accumulators 'w1', 'w2'")
    B, T, H, Dh = q.shape
    w1, w2 = initial_state["w1"], initial_state["w2"]
    if w1.dim() != 4 or w1.shape[:3] != (B, H, Dh) or w2.shape != (B, H, w1.shape[-1], Dh):
        raise ValueError(f"w1 must be [B, H, Dh, F] = [{B}, {H}, {Dh}, F] and w2 [B, H, F, Dh]; "
                         f"got {tuple(w1.shape)} and {tuple(w2.shape)}")
    n = int(initial_state.get("n", 0))
    if not 0 <= n < chunk_size:
        raise ValueError(f"the state's partial chunk holds n = {n} tokens; need 0 <= n < chunk_size = {chunk_size}")
    if len({"u1", "u2"} & initial_state.keys()) == 1 or (n > 0 and "u1" not in initial_state):
        raise ValueError("initial_state needs both running accumulators 'u1', 'u2', or neither (then n = 0)")
    dtype = torch.promote_types(q.dtype, torch.float32)
    u1, u2 = initial_state.get("u1", w1), initial_state.get("u2", w2)
    xs = [None if x is None else x.to(dtype).transpose(1, 2) for x in (q, k, v, log_alpha, eta, delta)]
    return xs, [w.to(dtype) for w in (w1, w2, u1, u2)], n


def _segment_sizes(T: int, n: int, chunk_size: int) -> list[int]:
    """Lengths of the segments of a call: the rest of the state's partial chunk, then whole chunks."""
    sizes, t = [], 0
    while t < T:
        sizes.append(min(chunk_size - n, T - t))
        t, n = t + sizes[-1], 0
    return sizes


def miras_chunked(q, k, v, log_alpha, eta, *, rule, initial_state, delta=None, chunk_size=16, p=3.0,
                  q_retention=4.0, output_final_state=False) -> tuple[Tensor, MemoryState | None]:
    """The training form: per segment (a chunk, or the part of one this call holds) the per-token
    terms at the chunk-start weights, one retrieval of every token from the weights after the tokens
    before it (_read_segment), and one closed-form gradient sum, weighted by the retention each token's
    gradient meets before the segment's end: O(T / chunk_size) Python steps. The inputs are split
    once (slicing per segment would make the backward pass add a zero-filled [B, H, T, Dh] gradient
    per segment and input: O(T^2 / chunk_size))."""
    in_dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):
        xs, (w1, w2, u1, u2), n = _prepare(
            q, k, v, log_alpha, eta, delta, rule, initial_state, chunk_size, p, q_retention)
        scale = input_scale(rule, w1.shape[-1])
        sizes = _segment_sizes(xs[0].shape[2], n, chunk_size)
        segments = zip(*[[None] * len(sizes) if x is None else x.split(sizes, dim=2) for x in xs])

        def at_chunk_start(w1, w2):  # the weights the gradients are taken at (Moneta: A and ||A||^(q-2))
            if rule != "moneta":
                return memory_weights(rule, w1, w2, q_retention), None
            return (w1, w2), (_normaliser(w1, q_retention), _normaliser(w2, q_retention))

        W, norms = at_chunk_start(w1, w2)
        out = []
        for qs, ks, vs, la, lr, ds in segments:  # [B, H, L, Dh] each
            h, d1, d2 = _token_terms(rule, *W, ks, vs, ds, p, scale, norms)
            out.append(_read_segment(rule, qs, ks, h, d1, d2, lr, la, {"w1": w1, "w2": w2, "u1": u1, "u2": u2},
                                     q_retention, scale, norms))
            # Retention from after token j to the segment's end: an exclusive reverse cumulative sum.
            after = torch.cat([la[:, :, 1:].flip(2).cumsum(2).flip(2), torch.zeros_like(la[:, :, :1])], dim=2)
            # The step's sign rides on the small weights: _retain adds -sum c G (no full-size negation).
            G1, G2 = _gradient_sum(ks, h, d1, d2, -lr * after.exp(), scale)
            u1, u2 = _retain(rule, la.sum(2).exp(), u1, u2, G1, G2, sign=1.0)
            n += qs.shape[2]
            if n == chunk_size:  # the chunk is complete: its end is the next chunk's start
                w1, w2, n = u1, u2, 0
                W, norms = at_chunk_start(w1, w2)
        o = torch.cat(out, dim=2).transpose(1, 2)
    state = {"w1": w1, "w2": w2, "u1": u1, "u2": u2, "n": n} if output_final_state else None
    return o.to(in_dtype), state


def _inner_loss(rule, W1, W2, k, v, delta, p, scale) -> Tensor:
    """The attentional bias summed over batch and heads (each (b, h) owns its W: the sum separates)."""
    e = memory_forward(W1, W2, k, scale) - v
    if rule == "moneta":
        return e.abs().pow(p).sum() / p
    if rule == "yaad":
        return torch.where(e.abs() <= delta, 0.5 * e * e, delta * (e.abs() - 0.5 * delta)).sum()
    return 0.5 * (e * e).sum()


def miras_recurrent(q, k, v, log_alpha, eta, *, rule, initial_state, delta=None, chunk_size=16, p=3.0,
                    q_retention=4.0, output_final_state=False) -> tuple[Tensor, MemoryState | None]:
    """The reference: the same chunked rule one token at a time (read, then write), the inner gradient
    by autodiff (torch.func.grad, which the outer backward pass differentiates through)."""
    in_dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):
        (q, k, v, log_alpha, eta, delta), (w1, w2, u1, u2), n = _prepare(
            q, k, v, log_alpha, eta, delta, rule, initial_state, chunk_size, p, q_retention)
        scale, out = input_scale(rule, w1.shape[-1]), []
        grad = torch.func.grad(lambda W1, W2, *a: _inner_loss(rule, W1, W2, *a), argnums=(0, 1))
        for t in range(q.shape[2]):
            s = slice(t, t + 1)
            W = memory_weights(rule, w1, w2, q_retention)  # the chunk-start weights: the gradient's
            R = read_weights(rule, {"w1": w1, "w2": w2, "u1": u1, "u2": u2}, q_retention)  # every earlier token
            out.append(memory_forward(*R, q[:, :, s], scale))
            G1, G2 = grad(*W, k[:, :, s], v[:, :, s], None if delta is None else delta[:, :, s], p, scale)
            a, lr = log_alpha[:, :, t].exp(), eta[:, :, t]  # [B, H, Dh]
            u1, u2 = _retain(rule, a, u1, u2, lr.unsqueeze(-1) * G1, lr.unsqueeze(-2) * G2)
            n += 1
            if n == chunk_size:
                w1, w2, n = u1, u2, 0
        o = torch.cat(out, dim=2).transpose(1, 2)
    state = {"w1": w1, "w2": w2, "u1": u1, "u2": u2, "n": n} if output_final_state else None
    return o.to(in_dtype), state


MIRAS_MODES = {"chunk": miras_chunked, "recurrent": miras_recurrent}
