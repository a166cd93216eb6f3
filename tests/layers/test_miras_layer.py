"""The Miras mixers (Moneta, Yaad, Memora): option checks, the chunked layer against the same layer on
the reference loop (outputs, states, every parameter and input gradient), the state's contents, the
initial memories, the first token written out by hand, Moneta over a long window, and the output's
dependence on the context. The mixer contract runs in
test_mixer_invariants.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rms

from gateloop.layers import MIXERS
from gateloop.layers.miras import Memora, Moneta, Yaad
from gateloop.ops.miras import memory_forward, memory_weights

D = 16
CLASSES = {"moneta": Moneta, "yaad": Yaad, "memora": Memora}
SMALL = {"head_dim": 8, "expansion": 2.0, "gate_rank": 4}


def make(name, seed=0, T=11, **opts):
    torch.manual_seed(seed)
    mixer = CLASSES[name](D, n_layers=2, **{**SMALL, **opts}).double()
    x = torch.randn(2, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return mixer, x


def test_registered():
    for name, cls in CLASSES.items():
        assert MIXERS[name] is cls
        assert "EXPERIMENTAL" in cls.__doc__


@pytest.mark.parametrize("opts,match", [
    ({"head_dim": 5}, "head_dim"), ({"expansion": 0.0}, "expansion"), ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 4.0}, "chunk_size"), ({"gate_rank": 0}, "gate_rank"), ({"eta_max": 0.0}, "eta_max"),
    ({"eta_max": math.inf}, "eta_max"), ({"mode": "scan"}, "mode"),
])
@pytest.mark.parametrize("name", CLASSES)
def test_bad_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        CLASSES[name](D, **{**SMALL, **opts})


@pytest.mark.parametrize("opts", [{"p": 1.5}, {"q": 1.0}])
def test_moneta_bad_exponents(opts):
    with pytest.raises(ValueError, match="p >= 2 and q >= 2"):
        Moneta(D, **SMALL, **opts)


@pytest.mark.parametrize("name", CLASSES)
def test_chunked_layer_matches_the_reference_loop(name):
    """mode="chunk" and mode="recurrent" share every parameter: same outputs and states, and the same
    gradients for every parameter and the input, across a call that ends mid-chunk and its continuation."""
    mixer, x = make(name, chunk_size=4)
    w = torch.randn_like(x)

    def run(mode):
        mixer.mode = mode
        mixer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        y1, s1 = mixer(xg[:, :6])
        y2, s2 = mixer(xg[:, 6:], s1)
        y = torch.cat([y1, y2], dim=1)
        loss = (y * w).sum() + sum(s2[key].sum() for key in ("w1", "w2", "u1", "u2"))
        loss.backward()
        return y.detach(), s2, {n: p.grad for n, p in mixer.named_parameters()}, xg.grad

    y, s, grads, x_grad = run("chunk")
    y_ref, s_ref, grads_ref, x_grad_ref = run("recurrent")
    assert_close_rms(y, y_ref, what="outputs")
    assert s["n"] == s_ref["n"] == 11 % 4
    for key in ("w1", "w2", "u1", "u2"):
        assert_close_rms(s[key], s_ref[key], what=f"state {key}")
    for n, g in grads_ref.items():
        assert_close_rms(grads[n], g, what=f"grad {n}")
    assert_close_rms(x_grad, x_grad_ref, what="grad x")


@pytest.mark.parametrize("name", CLASSES)
@torch.no_grad()
def test_state_contents(name):
    mixer, x = make(name, T=13, chunk_size=4)
    _, state = mixer(x)
    H, Dh, Fh = 2, 8, 16
    assert set(state) == {"w1", "w2", "u1", "u2", "n"} and state["n"] == 1
    for key in ("w1", "u1"):
        assert state[key].shape == (2, H, Dh, Fh) and state[key].dtype == torch.float64
    for key in ("w2", "u2"):
        assert state[key].shape == (2, H, Fh, Dh)
    _, at_boundary = mixer(x[:, :12])  # 12 tokens: three whole chunks, nothing pending
    assert at_boundary["n"] == 0
    assert torch.equal(at_boundary["w1"], at_boundary["u1"])
    # The same chunk-start weights as the 13-token call's, up to rounding: the projections of 12 and
    # of 13 rows may take different matrix-multiply blockings.
    assert_close_rms(at_boundary["w1"], state["w1"], what="chunk-start weights")
    if name == "memora":
        for key, axis in (("w1", -1), ("u1", -1), ("w2", -2), ("u2", -2)):
            W = state[key].exp()
            assert (W > 0).all()
            assert_close_rms(W.sum(axis), torch.ones_like(W.sum(axis)), what=f"{key} over the hidden axis")


@pytest.mark.parametrize("name", CLASSES)
@torch.no_grad()
def test_first_chunk_written_out(name):
    """The first token reads the learned initial memory (later ones read what came before them):
    out = W_o( RMSNorm(M(W_0; q_t)) (.) silu(W_g x_t) ), q_t = RMSNorm(W_q x_t) per head."""
    mixer, x = make(name, T=7, chunk_size=8)
    with torch.no_grad():
        for norm in (mixer.q_norm, mixer.out_norm):
            norm.weight.uniform_(0.5, 1.5)
    y, _ = mixer(x)
    q = mixer.W_q(x).view(2, 7, 2, 8)
    q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * mixer.q_norm.weight
    w1, w2 = mixer.initial_accumulators(torch.float64)
    W1, W2 = memory_weights(name, w1, w2)
    scale = 16.0 if name == "memora" else 1.0
    o = memory_forward(W1, W2, q.transpose(1, 2), scale).transpose(1, 2)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * mixer.out_norm.weight
    expected = mixer.W_o(o.reshape(2, 7, D) * F.silu(mixer.W_g(x)))
    assert_close_rms(y[:, :1], expected[:, :1], what="the first token by hand")
    assert (y[:, 1:] - expected[:, 1:]).abs().max() > 1e-6, "later tokens read the memory they wrote"


@torch.no_grad()
def test_initial_memories():
    """Moneta stores A_0 with W(A_0) = W_0 ~ N(0, 1 / fan_in); Memora's W_0 are distributions over the
    hidden axis; Yaad's W_0 are the drawn weights and its Huber threshold starts at 1."""
    moneta, x = make("moneta")
    W1, W2 = memory_weights("moneta", *moneta.initial_accumulators(torch.float64))
    for W, fan_in in ((W1, 8), (W2, 16)):
        assert 0.8 < W.std().item() * math.sqrt(fan_in) < 1.2
    memora = make("memora")[0]
    W1, W2 = (w.exp() for w in memora.initial_accumulators(torch.float64))
    assert (W1 > 0).all() and (W2 > 0).all()
    assert_close_rms(W1.sum(-1), torch.ones(2, 8, dtype=torch.float64), what="W1 rows")
    assert_close_rms(W2.sum(-2), torch.ones(2, 8, dtype=torch.float64), what="W2 columns")
    yaad = make("yaad")[0]
    assert 0.8 < yaad.w1_init.std().item() * math.sqrt(8) < 1.2
    delta = yaad.gates(torch.zeros(1, 1, D, dtype=torch.float64))["delta"]
    assert_close_rms(delta, torch.ones_like(delta), tol=1e-6, what="delta at x = 0 (a float32 bias)")
    assert not hasattr(moneta, "W_delta") and not hasattr(memora, "W_delta")


@pytest.mark.parametrize("floor,finite", [(None, True), (0.0, False)])
@torch.no_grad()
def test_moneta_stays_finite_over_a_long_window(monkeypatch, floor, finite):
    """A fresh Moneta on 4096 random inputs in float32 (the board's context length). Without the norm
    floor (floor 0, the control) retention shrinks A until sum |A|^4 underflows and W turns inf/NaN
    (here after ~3,500 tokens); with it every output is finite. Every channel starts at the one
    retention time of the layers before 2026-12 (sigma(5): ~150 tokens), where the control fails;
    the spread default keeps fast channels that write, and its sums stay away from underflow here."""
    import gateloop.ops.miras as ops

    if floor is not None:
        monkeypatch.setattr(ops, "MONETA_NORM_FLOOR", floor)
    torch.manual_seed(0)
    tau = 1 + math.exp(5.0)
    mixer = Moneta(D, **SMALL, chunk_size=64, retention_time_min=tau, retention_time_max=tau)  # float32: ~1 s
    y, state = mixer(torch.randn(1, 4096, D, generator=torch.Generator().manual_seed(1)))
    assert bool(torch.isfinite(y).all()) == finite
    if finite:
        assert all(torch.isfinite(state[key]).all() for key in ("w1", "w2", "u1", "u2"))


@pytest.mark.parametrize("name", CLASSES)
@torch.no_grad()
def test_the_output_depends_on_the_context(name):
    """The memory carries the past: the last tokens' outputs change when the earlier context does
    (same last tokens, other context), far beyond the rounding, and with the state zeroed out of
    the picture (a fresh memory) they differ from both."""
    mixer, x = make(name, T=40, chunk_size=8)
    other = x.clone()
    other[:, :30] = torch.randn(2, 30, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    y, _ = mixer(x)
    y_other, _ = mixer(other)
    y_fresh, _ = mixer(x[:, 30:])
    for a, b in ((y, y_other), (y, y_fresh), (y_other, y_fresh)):
        rel = (a[:, 30:] - b[:, -10:]).norm() / b[:, -10:].norm()
        assert rel > 1e-2, f"{name}: relative change {rel:.2e}"
    assert torch.equal(y[:, 30:31] * 0, y_other[:, 30:31] * 0)  # same shapes, finite


@pytest.mark.parametrize("name", CLASSES)
def test_retention_times_at_init_spread_over_each_heads_channels(name):
    """alpha's bias puts the retention times 1 / (1 - alpha) log-uniform in [2, 256] over each head's
    channels, the same in every head; equal bounds give one time (the old ~150-token start)."""
    mixer = CLASSES[name](D, **SMALL)
    alpha = torch.sigmoid(mixer.W_alpha.up.bias.detach().double()).view(mixer.n_heads, mixer.head_dim)
    tau = 1 / (1 - alpha)
    assert torch.allclose(tau[:, 0], torch.full_like(tau[:, 0], 2.0)) and torch.allclose(tau[:, -1], tau[:, -1] * 0 + 256)
    assert (tau.diff(dim=-1) > 0).all() and torch.allclose(tau, tau[:1].expand_as(tau))
    one = CLASSES[name](D, **SMALL, retention_time_min=150.0, retention_time_max=150.0)
    assert torch.allclose(torch.sigmoid(one.W_alpha.up.bias.double()), torch.tensor(1 - 1 / 150, dtype=torch.float64))
    with pytest.raises(ValueError, match="retention_time"):
        CLASSES[name](D, **SMALL, retention_time_min=1.0)
