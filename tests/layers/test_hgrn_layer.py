"""The HGRN and HGRN2 mixers against loops written here from the papers' equations (outputs, final
states, all gradients including the initial state's), the depth-rising lower bound, every option."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rms, assert_probes_close, probe_layer

from gateloop.layers.hgrn import HGRN, HGRN2, ForgetGate

D, B, T = 8, 2, 19  # T = 19: odd, and not a multiple of the chunk size 4 used below
LAYER, N_LAYERS = 1, 3  # a layer whose lower bound is not zero


def paper_gamma(layer):
    """The layer's lower bound, from its options: [D], differentiable when learned."""
    gate = layer.forget
    if gate.kind == "learned" and layer.layer_idx > 0:
        return torch.sigmoid(gate.gamma_logit)
    if gate.kind == "none":
        return 0.0
    return layer.layer_idx / layer.n_layers


def hgrn_loop(layer, x, h0):
    """HGRN, step by step: h_t = lambda_t e^{i theta} h_{t-1} + (1 - lambda_t) c_t."""
    gamma = paper_gamma(layer)
    lam = gamma + (1 - gamma) * torch.sigmoid(layer.W_mu(x))  # [B, T, D]
    c = F.silu(layer.W_c(x))
    a = lam
    if layer.use_complex:
        c = torch.complex(c[..., :D], c[..., D:])
        a = torch.polar(lam, layer.theta.expand_as(lam))
    h, hs = h0, []
    for t in range(x.shape[1]):
        h = a[:, t] * h + (1 - lam[:, t]) * c[:, t]
        hs.append(h)
    h_all = torch.stack(hs, dim=1)
    feat = torch.cat([h_all.real, h_all.imag], dim=-1) if layer.use_complex else h_all
    g = F.silu(layer.W_g(x))
    y = layer.norm(g * feat) if layer.norm_order == "gate_then_norm" else layer.norm(feat) * g
    return layer.W_o(y), h


def hgrn2_loop(layer, x, S0):
    """HGRN2 with its matrix state materialised: S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T, y_t = o_t^T S_t."""
    H, K = layer.n_heads, layer.head_dim
    gamma = paper_gamma(layer)
    f = (gamma + (1 - gamma) * torch.sigmoid(layer.W_f(x))).view(B, -1, H, K)
    i = F.silu(layer.W_i(x)).view(B, -1, H, K)
    o = torch.sigmoid(layer.W_q(x)).view(B, -1, H, K)
    S, ys = S0, []
    for t in range(x.shape[1]):
        S = f[:, t, :, :, None] * S + (1 - f[:, t, :, :, None]) * i[:, t, :, None, :]  # [B, H, K, V]
        ys.append(torch.einsum("bhk,bhkv->bhv", o[:, t], S))
    y = torch.stack(ys, dim=1)  # [B, T, H, V]
    y = layer.norm(y.reshape(B, -1, D // layer.norm_size, layer.norm_size)).reshape(B, -1, D)
    if layer.W_g is not None:
        y = y * F.silu(layer.W_g(x))
    return layer.W_o(y), S


def check_against_loop(layers, loop, state_shape, state_dtype):
    """Every layer (one per mode, same weights) against the loop: outputs, states, all gradients."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, dtype=torch.float64, generator=g)
    state0 = torch.randn(state_shape, dtype=state_dtype, generator=g)
    ref = layers[0]
    expected = probe_layer(lambda x, s: loop(ref, x, s), ref, x, state0)
    for n, grad in expected[1].items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, f"bad gradient for {n}"
    for layer in layers:
        result = probe_layer(layer, layer, x, state0)
        assert result[0][1].dtype == state_dtype
        assert_probes_close(result, expected, what=f"{layer.mode}:")


HGRN_COMBOS = [dict(use_complex=c, norm_order=n, lower_bound=lb) for c, n, lb in itertools.product(
    [True, False], ["gate_then_norm", "norm_then_gate"], ["fixed", "learned", "none"])]
HGRN2_COMBOS = [dict(head_dim=4, lower_bound="fixed"), dict(head_dim=4, lower_bound="learned", output_gate=True),
                dict(head_dim=1, lower_bound="none"), dict(head_dim=8, lower_bound="fixed", output_gate=True)]


@pytest.mark.parametrize("opts", HGRN_COMBOS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_hgrn_modes_match_the_paper_loop(opts):
    layers = []
    for mode in ["blocked", "scan", "recurrent"]:
        torch.manual_seed(0)
        layers.append(HGRN(D, layer_idx=LAYER, n_layers=N_LAYERS, mode=mode, **opts).double())
    state_dtype = torch.complex128 if opts["use_complex"] else torch.float64
    check_against_loop(layers, hgrn_loop, (B, D), state_dtype)


@pytest.mark.parametrize("opts", HGRN2_COMBOS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_hgrn2_modes_match_the_matrix_state_loop(opts):
    layers = []
    for mode, extra in [("chunk", {"chunk_size": 4}), ("chunk", {}), ("scan", {}), (None, {}), ("recurrent", {})]:
        torch.manual_seed(0)
        layers.append(HGRN2(D, layer_idx=LAYER, n_layers=N_LAYERS, mode=mode, **extra, **opts).double())
    K = opts["head_dim"]
    check_against_loop(layers, hgrn2_loop, (B, D // K, K, K), torch.float64)


def test_hgrn2_mode_none_takes_the_scan_on_cpu_where_gateloop_would(monkeypatch):
    """HGRN2's decay is real and per key channel: mode=None follows GateLoop's pick_mode for that
    case (the fused scan on CPU; the chunk form without the kernels at head_dim 64)."""
    from gateloop.layers import hgrn

    layer = HGRN2(D, head_dim=4)
    monkeypatch.setattr(hgrn, "fused_scan_available", lambda x: True)
    assert layer.auto_mode(torch.device("cpu")) == "scan"
    monkeypatch.setattr(hgrn, "fused_scan_available", lambda x: False)
    assert HGRN2(64, head_dim=64).auto_mode(torch.device("cpu")) == "chunk"
    assert layer.auto_mode(torch.device("cpu")) == "scan"  # head_dim <= 16: the PyTorch scan still wins


@pytest.mark.parametrize("lower_bound", ["fixed", "learned"])
@pytest.mark.parametrize("cls,opts", [(HGRN, {}), (HGRN2, {"head_dim": 4})], ids=["hgrn", "hgrn2"])
def test_lower_bound_is_zero_in_the_first_layer_and_rises_with_depth(cls, opts, lower_bound):
    n_layers = 6
    bounds = [cls(D, layer_idx=k, n_layers=n_layers, lower_bound=lower_bound, **opts).lower_bound()
              for k in range(n_layers)]
    assert all(b.shape == (D,) for b in bounds)
    assert (bounds[0] == 0).all()
    for k in range(1, n_layers):
        assert (bounds[k] > bounds[k - 1]).all(), f"layer {k}'s bound does not rise"
    assert (bounds[-1] < 1).all()
    unbounded = cls(D, layer_idx=n_layers - 1, n_layers=n_layers, lower_bound="none", **opts)
    assert (unbounded.lower_bound() == 0).all()


@pytest.mark.parametrize("lower_bound", ["fixed", "learned"])
def test_forget_gate_stays_above_its_bound_in_log_space(lower_bound):
    """lambda = gamma + (1 - gamma) sigma(z): gamma as z -> -inf, 1 as z -> +inf, and both logs exact."""
    z = torch.tensor([-80.0, 0.0, 80.0], dtype=torch.float64)
    for k in range(4):
        gate = ForgetGate(3, layer_idx=k, n_layers=4, lower_bound=lower_bound).double()
        gamma = torch.sigmoid(gate.gamma_logit) if k > 0 and lower_bound == "learned" else torch.tensor(k / 4.0)
        log_lam, log_1m_lam = gate(z)
        lam = gamma + (1 - gamma) * torch.sigmoid(z)
        assert_close_rms(log_lam.exp(), lam, torch.float64)
        assert torch.isfinite(log_lam).all() and torch.isfinite(log_1m_lam).all()
        assert_close_rms(log_1m_lam, torch.log1p(-gamma.double()) + F.logsigmoid(-z), torch.float64)
        if k == 0:
            assert_close_rms(log_lam, F.logsigmoid(z), torch.float64)  # no floor: lambda ~ e^-80


def test_learned_bound_is_a_parameter_and_fixed_is_not():
    learned = HGRN(D, layer_idx=2, n_layers=4, lower_bound="learned")
    assert "forget.gamma_logit" in dict(learned.named_parameters())
    fixed = HGRN(D, layer_idx=2, n_layers=4)
    assert not any("gamma" in name for name in fixed.state_dict())
    assert not any("gamma" in name for name in dict(HGRN(D, lower_bound="learned").named_parameters()))
    fixed.load_state_dict(HGRN(D, layer_idx=3, n_layers=4).state_dict())  # the bound stays the layer's
    assert (fixed.lower_bound() == 0.5).all()


ALL_OPTIONS = (
    [(HGRN, dict(use_complex=c, norm_order=n, lower_bound=lb, mode=m)) for c, n, lb, m in itertools.product(
        [True, False], ["gate_then_norm", "norm_then_gate"], ["fixed", "learned", "none"], ["scan", "recurrent"])]
    + [(HGRN2, dict(head_dim=h, lower_bound=lb, mode=m, output_gate=og, chunk_size=cs))
       for h, lb, m, og, cs in itertools.product([1, 4, 8], ["fixed", "learned", "none"], ["chunk", "scan", None],
                                                 [False, True], [None, 3])])


@pytest.mark.parametrize("cls,opts", ALL_OPTIONS)
@torch.no_grad()
def test_every_option_constructs_and_runs(cls, opts):
    layer = cls(D, layer_idx=1, n_layers=2, **opts)
    x = torch.randn(B, 5, D)
    y, state = layer(x)
    y_next, _ = layer(x[:, :1], state)
    assert y.shape == x.shape and y_next.shape == (B, 1, D)
    assert torch.isfinite(y).all() and torch.isfinite(y_next).all()
    assert repr(layer)


@pytest.mark.parametrize("cls,opts", [
    (HGRN, dict(norm_order="norm_first")), (HGRN, dict(mode="chunk")), (HGRN, dict(lower_bound="learnt")),
    (HGRN, dict(layer_idx=2, n_layers=2)), (HGRN, dict(layer_idx=-1)),
    (HGRN2, dict(head_dim=3)), (HGRN2, dict(head_dim=0)), (HGRN2, dict(mode="blocked")),
    (HGRN2, dict(head_dim=4, chunk_size=0)), (HGRN2, dict(head_dim=4, lower_bound="")),
])
def test_bad_options_are_named(cls, opts):
    with pytest.raises(ValueError):
        cls(D, **opts)
