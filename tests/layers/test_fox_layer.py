"""The FoX mixer: option checks, the gate kinds, the Pro block's formulas written out by hand, the
state's contents, and ACP inside the layer. The mixer contract itself is test_mixer_invariants.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rms

from gateloop.layers.fox import ForgettingAttention
from gateloop.ops.forgetting_attn import forgetting_attention_naive

D = 16


def make(seed=0, T=23, **opts):
    torch.manual_seed(seed)
    mixer = ForgettingAttention(D, head_dim=4, **opts).double()
    x = torch.randn(2, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return mixer, x


@pytest.mark.parametrize("opts,match", [
    ({"forget_gate": "data"}, "forget_gate"), ({"head_dim": 5}, "head_dim"),
    ({"log_pruning_tolerance": 0.0}, "log_pruning_tolerance"), ({"block_size": 0}, "block_size"),
    ({"decay_time_min": 8.0, "decay_time_max": 4.0}, "decay_time"), ({"decay_time_min": 0.0}, "decay_time"),
])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        ForgettingAttention(D, **{"head_dim": 4, **opts})


@torch.no_grad()
def test_plain_fox_without_gate_is_causal_softmax_attention():
    """forget_gate="none" with every Pro option off: multi-head causal attention, no positions at all."""
    mixer, x = make(forget_gate="none", qk_norm=False, shift=False, output_gate=False, output_norm=False)
    y, _ = mixer(x)
    q, k, v = (W(x).view(2, -1, 4, 4).transpose(1, 2) for W in (mixer.W_q, mixer.W_k, mixer.W_v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
    assert_close_rms(y, mixer.W_o(o), what="FoX without a forget gate")
    assert not any("W_f" in n or "b_f" in n for n, _ in mixer.named_parameters())


@torch.no_grad()
def test_gate_kinds():
    _, x = make()
    tau = torch.logspace(math.log10(2), math.log10(256), 4, dtype=torch.float64)
    fixed = make(forget_gate="fixed")[0]
    assert "log_f_fixed" in dict(fixed.named_buffers())
    assert not {"W_f.weight", "W_f.bias", "b_f"} & set(dict(fixed.named_parameters()))
    assert_close_rms(fixed.compute_log_f(x), (-1 / tau).expand(2, 23, 4), tol=1e-6, what="fixed gates")
    bias = make(forget_gate="bias")[0]
    assert isinstance(bias.b_f, torch.nn.Parameter)
    assert_close_rms(bias.compute_log_f(x), (-1 / tau).expand(2, 23, 4), tol=1e-6, what="bias gates at init")
    full = make(forget_gate="full")[0]
    log_f = full.compute_log_f(x)
    assert log_f.shape == (2, 23, 4) and (log_f < 0).all() and log_f.std() > 0
    assert_close_rms(log_f, F.logsigmoid(x @ full.W_f.weight.t()), what="full gates, b_f = 0 at init")
    assert (make(forget_gate="none")[0].compute_log_f(x) == 0).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert full.float().compute_log_f(x.float()).dtype == torch.float32


def test_pro_block_matches_the_formulas():
    """Shift (before the qk-norm), qk-norm, gate, output norm and output gate, written out by hand
    around the reference op, with trained-looking (non-unit) norm scales."""
    mixer, x = make(T=19)
    with torch.no_grad():
        for norm in (mixer.q_norm, mixer.k_norm, mixer.out_norm):
            norm.weight.uniform_(0.5, 1.5)
    y, state = mixer(x)

    def heads(t):
        return t.view(2, 19, 4, 4)

    def rms(t, w):
        return t / (t.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w

    def shift(t, W_alpha):
        a = torch.sigmoid(W_alpha(x)).unsqueeze(-1)
        return a * torch.cat([torch.zeros_like(t[:, :1]), t[:, :-1]], dim=1) + (1 - a) * t

    k_raw, v_raw = heads(mixer.W_k(x)), heads(mixer.W_v(x))
    q = rms(heads(mixer.W_q(x)), mixer.q_norm.weight)
    k = rms(shift(k_raw, mixer.W_alpha_k), mixer.k_norm.weight)
    v = shift(v_raw, mixer.W_alpha_v)
    log_f = F.logsigmoid(mixer.W_f(x))
    o = rms(forgetting_attention_naive(q, k, v, log_f), mixer.out_norm.weight).reshape(2, 19, D)
    assert_close_rms(y, mixer.W_o(o * torch.sigmoid(mixer.W_g(x))), what="Pro block")
    assert_close_rms(state["k"], k, what="cached keys")
    assert_close_rms(state["v"], v, what="cached values")
    assert_close_rms(state["k_shift"], k_raw[:, -1:], what="key shift state")
    assert_close_rms(state["v_shift"], v_raw[:, -1:], what="value shift state")
    assert state["c"].dtype == torch.float64
    assert_close_rms(state["c"], log_f.cumsum(1), what="running cumulative log-gate")


def test_without_shift_the_state_has_no_shift_entries():
    mixer, x = make(shift=False)
    _, state = mixer(x)
    assert sorted(state) == ["c", "k", "v"]
    assert state["k"].shape == (2, 23, 4, 4) and state["c"].shape == (2, 23, 4)


@torch.no_grad()
def test_acp_in_the_mixer():
    """Strong fixed forgetting (decay times 1 .. 4 steps): the layer prunes most tiles, in one call and
    token by token, and its output stays within the eps bound of the exact layer."""
    opts = dict(T=200, forget_gate="fixed", decay_time_min=1.0, decay_time_max=4.0, block_size=16)
    exact, x = make(**opts)
    pruned, _ = make(**opts, log_pruning_tolerance=-10.0)
    y, _ = exact(x)
    y_acp, _ = pruned(x)
    assert exact.pruned_fraction is None and pruned.pruned_fraction > 0.5, pruned.pruned_fraction
    assert_close_rms(y_acp, y, tol=1e-6, what="ACP vs exact mixer")

    s, ys = None, []
    for t in range(0, 200, 25):  # a few chunks, then the cache carries everything
        y_t, s = pruned(x[:, t:t + 25], s)
        ys.append(y_t)
    assert pruned.pruned_fraction > 0.5  # the last call's
    assert_close_rms(torch.cat(ys, dim=1), y, tol=1e-6, what="ACP in chunks vs exact mixer")
