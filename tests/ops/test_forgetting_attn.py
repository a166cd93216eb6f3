"""Forgetting Attention: the blockwise op against the naive reference (outputs and every gradient),
softmax attention at log_f = 0, the KV-cache form, long-sequence precision, and ACP's guarantees."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close_rms

from gateloop.ops.forgetting_attn import cumulative_log_f, forgetting_attention, forgetting_attention_naive


def make(T, *, S=0, B=2, H=2, K=8, V=5, gate_bias=2.0, seed=0, dtype=torch.float64):
    """Leaves in dtype: q [B, T, H, K]; k, v over the S + T positions; log_f [B, T, H] (f ~ sigma(gate_bias
    + z)); c_past [B, S, H] when S > 0, with an offset (only differences of c may matter)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = {"q": rnd(B, T, H, K), "k": rnd(B, S + T, H, K), "v": rnd(B, S + T, H, V),
         "log_f": F.logsigmoid(gate_bias + rnd(B, T, H))}
    if S:
        x["c_past"] = cumulative_log_f(F.logsigmoid(gate_bias + rnd(B, S, H))) - 7.0
    return {name: t.to(dtype).requires_grad_() for name, t in x.items()}


def run(fn, x, **kw):
    return fn(x["q"], x["k"], x["v"], x["log_f"], c_past=x.get("c_past"), **kw)


def grads(o, x, seed=1):
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(o.dtype)
    return dict(zip(x, torch.autograd.grad((o * w).sum(), list(x.values()))))


def assert_matches(o, o_ref, x, what):
    assert_close_rms(o, o_ref, what=f"{what}: output")
    g, g_ref = grads(o, x), grads(o_ref, x)
    for name in x:
        assert_close_rms(g[name], g_ref[name], what=f"{what}: grad {name}")


@pytest.mark.parametrize("T,block_size", [(1, 64), (7, 4), (64, 64), (65, 64), (300, 64), (300, 16)])
def test_blockwise_equals_naive(T, block_size):
    x = make(T)
    o = run(forgetting_attention, x, block_size=block_size)
    assert o.shape == (2, T, 2, 5) and o.dtype == torch.float64
    assert_matches(o, run(forgetting_attention_naive, x), x, f"T={T}, block {block_size}")


def test_float32_against_float64_reference():
    x = make(300, gate_bias=0.0)
    x32 = {n: t.detach().float().requires_grad_() for n, t in x.items()}
    o32 = run(forgetting_attention, x32, block_size=16)
    assert o32.dtype == torch.float32
    assert_close_rms(o32, run(forgetting_attention_naive, x), tol=TOL[torch.float32], what="float32 output")
    g32, g64 = grads(o32, x32), grads(run(forgetting_attention_naive, x), x)
    for name in x:
        assert_close_rms(g32[name], g64[name], tol=TOL[torch.float32], what=f"float32 grad {name}")


@pytest.mark.parametrize("S,T,block_size", [(13, 5, 8), (40, 1, 8), (17, 30, 8), (64, 64, 16), (3, 1, 64)])
def test_kv_cache_form(S, T, block_size):
    """Queries at positions S .. S+T-1 over S + T keys: against the reference (gradients into the cache
    and c_past included) and against the last T rows of one call over the whole sequence."""
    x = make(T, S=S)
    o = run(forgetting_attention, x, block_size=block_size)
    assert_matches(o, run(forgetting_attention_naive, x), x, f"S={S}, T={T}")
    with torch.no_grad():
        c = torch.cat([x["c_past"], x["c_past"][:, -1:] + x["log_f"].cumsum(1)], dim=1)
        q_full = torch.cat([torch.randn(2, S, 2, 8, dtype=torch.float64), x["q"]], dim=1)
        log_f_full = torch.cat([c[:, :1], c.diff(dim=1)], dim=1)  # any first gate: only differences count
        o_full = forgetting_attention(q_full, x["k"], x["v"], log_f_full, block_size=block_size)
    assert_close_rms(o.detach(), o_full[:, S:], what="cached call vs one call")


@pytest.mark.parametrize("T", [65, 300])
def test_no_forgetting_is_causal_softmax_attention(T):
    x = make(T)
    zero = torch.zeros_like(x["log_f"])
    q, k, v = (x[n].detach().transpose(1, 2) for n in "qkv")
    for scale in (None, 0.3):
        o = forgetting_attention(x["q"], x["k"], x["v"], zero, scale=scale, block_size=32)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(1, 2)
        assert_close_rms(o, ref, what=f"log_f = 0, scale {scale}")


def test_long_sequence_keeps_float32_precision():
    """|c| reaches ~1600 here. With c summed in float32 the output is off by ~1.4e-5 relative RMS (within
    TOL, so TOL alone would not notice); the op sums c in float64 and re-centres it per query block
    before the cast, which leaves ~6e-7: float32 rounding of the scores themselves."""
    x = make(2048, B=1, H=1, gate_bias=0.0, seed=3)  # log f ~ -0.8 per step
    with torch.no_grad():
        o32 = run(forgetting_attention, {n: t.float() for n, t in x.items()})
        ref = run(forgetting_attention_naive, x)
    assert x["log_f"].sum() < -1500
    assert_close_rms(o32, ref, tol=3e-6, what="T = 2048, float32")


def pruned_reference(x, kept, block_size):
    """The softmax with the ACP-pruned tiles masked out, and the unpruned softmax P: [B, H, T, S+T]."""
    q, k, v = x["q"], x["k"], x["v"]
    T, Tk = q.shape[1], k.shape[1]
    S = Tk - T
    c = cumulative_log_f(x["log_f"], x.get("c_past"))
    D = (c[:, S:, None] - c[:, None, :]).permute(0, 3, 1, 2)
    scores = torch.einsum("bthk,bshk->bhts", q, k) * q.shape[-1] ** -0.5 + D
    causal = torch.ones(T, Tk, dtype=torch.bool).tril(S)
    q_block = (S + torch.arange(T)) // block_size - S // block_size
    k_block = torch.arange(Tk) // block_size
    allowed = kept[:, :, q_block][:, :, :, k_block] & causal  # [B, H, T, S+T]
    p = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    p_full = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
    return torch.einsum("bhts,bshv->bthv", p, v), p_full, causal & ~allowed


@pytest.mark.parametrize("S,log_tol", [(0, -10.0), (0, -3.0), (37, -10.0)])
def test_acp_bound_and_exactness(S, log_tol):
    """Strong forgetting (f ~ 0.73): whole tiles are pruned; what is left is exactly the masked softmax
    (outputs and gradients); the unpruned softmax mass on the pruned positions is <= eps per row, and
    the output moves by at most 2 eps max|v|."""
    bs, eps = 16, math.exp(log_tol)
    x = make(400, S=S, K=16, gate_bias=1.0, seed=2)
    o, stats = run(forgetting_attention, x, block_size=bs, log_pruning_tolerance=log_tol, return_stats=True)
    B, H, nq, nk = stats.kept.shape
    assert (nq, nk) == (-(-(S + 400) // bs) - S // bs, -(-(S + 400) // bs))
    assert stats.threshold.shape == (B, H) and (stats.threshold < log_tol).all()
    assert 0.3 < stats.pruned_fraction < 1, stats.pruned_fraction
    causal_tiles = torch.ones(nq, nk, dtype=torch.bool).tril(S // bs)
    assert not (stats.kept & ~causal_tiles).any()
    assert stats.pruned_fraction == pytest.approx(1 - stats.kept.sum().item() / (B * H * causal_tiles.sum().item()))

    o_ref, p_full, pruned = pruned_reference(x, stats.kept, bs)
    assert_matches(o, o_ref, x, "ACP vs masked softmax")
    mass = (p_full * pruned).sum(-1)
    assert mass.max() <= eps, f"pruned mass {mass.max():.2e} > eps {eps:.2e}"
    o_exact = run(forgetting_attention_naive, x)
    err = (o - o_exact).abs().max()
    assert err <= 2 * eps * x["v"].abs().max(), f"ACP error {err:.2e}"


def test_acp_prunes_nothing_without_forgetting():
    x = make(300)
    zero = torch.zeros_like(x["log_f"])
    o, stats = forgetting_attention(x["q"], x["k"], x["v"], zero, block_size=16, log_pruning_tolerance=-10.0,
                                    return_stats=True)
    assert stats.pruned_fraction == 0 and stats.kept.sum() == 4 * (19 * 20 // 2)
    assert_close_rms(o, forgetting_attention_naive(x["q"], x["k"], x["v"], zero), what="nothing pruned")
    _, stats = run(forgetting_attention, x, return_stats=True)
    assert stats.pruned_fraction == 0 and stats.threshold is None


def test_bfloat16_inputs_compute_in_float32():
    x = make(100)
    xb = {n: t.detach().bfloat16() for n, t in x.items()}
    o = run(forgetting_attention, xb, block_size=16)
    assert o.dtype == torch.bfloat16
    ref = run(forgetting_attention_naive, {n: t.float() for n, t in xb.items()})
    assert_close_rms(o.float(), ref, tol=1e-2, what="bfloat16")


def test_bad_arguments():
    x = {n: t.detach() for n, t in make(10, S=4).items()}
    q, k, v, log_f, c_past = x["q"], x["k"], x["v"], x["log_f"], x["c_past"]
    with pytest.raises(ValueError, match="c_past"):
        forgetting_attention(q, k, v, log_f)
    with pytest.raises(ValueError, match="log_f"):
        forgetting_attention(q, k, v, log_f[:, :-1], c_past=c_past)
    with pytest.raises(ValueError, match="T"):
        forgetting_attention_naive(k, q, v, log_f)
    with pytest.raises(ValueError, match="block_size"):
        forgetting_attention(q, k, v, log_f, c_past=c_past, block_size=0)
    for tol in (0.0, 1.0, -math.inf):
        with pytest.raises(ValueError, match="log_pruning_tolerance"):
            forgetting_attention(q, k, v, log_f, c_past=c_past, log_pruning_tolerance=tol)
