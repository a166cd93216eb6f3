"""The GateLoop layer: every option combination, the four modes against each other (outputs, final
states and all gradients, the initial state's included), lr_scale, fixed transitions, bad options."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from conftest import assert_close_rms, assert_probes_close, probe_layer

from gateloop.layers import GateLoop
from gateloop.layers import gateloop as gateloop_layer
from gateloop.layers.gateloop import pick_mode

D, B, T = 8, 2, 19  # T = 19: odd, and not a multiple of the chunk size 4 used below
MODES = ["chunk", "scan", "attention", "recurrent"]
COMBOS = [
    dict(head_dim=hd, decay=dc, use_complex=cx, transition=tr, output_gate=og, norm=nm)
    for hd, dc, cx, tr, og, nm in itertools.product([1, 4], ["channel", "head"], [True, False],
                                                    ["data", "fixed", "none"], [True, False], [True, False])
    if not (tr == "none" and cx)
]


def combo_id(c):
    return (f"hd{c['head_dim']}-{c['decay']}-{'cplx' if c['use_complex'] else 'real'}-{c['transition']}"
            f"{'-gate' if c['output_gate'] else ''}{'-norm' if c['norm'] else ''}")


@pytest.mark.parametrize("opts", COMBOS, ids=combo_id)
def test_modes_agree_on_outputs_states_and_gradients(opts):
    torch.manual_seed(0)
    ref = GateLoop(D, mode="recurrent", **opts).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, dtype=torch.float64, generator=g)
    H, K = ref.n_heads, ref.head_dim
    state_dtype = torch.complex128 if opts["use_complex"] else torch.float64
    state0 = torch.randn(B, H, K, K, dtype=state_dtype, generator=g)
    expected = probe_layer(ref, ref, x, state0)
    (y_ref, s_ref), g_ref = expected
    assert y_ref.shape == (B, T, D) and s_ref.shape == (B, H, K, K) and s_ref.dtype == state_dtype
    for n, grad in g_ref.items():
        assert grad is not None and torch.isfinite(grad).all(), f"bad gradient for {n}"
    for mode in MODES[:3]:
        layer = GateLoop(D, mode=mode, chunk_size=4 if mode == "chunk" else None, **opts).double()
        layer.load_state_dict(ref.state_dict())
        assert_probes_close(probe_layer(layer, layer, x, state0), expected, what=f"{mode}:")


def test_shapes_and_heads():
    assert GateLoop(12).n_heads == 12  # max-headed: the paper's layer
    layer = GateLoop(128, head_dim=64, decay="channel")
    assert (layer.n_heads, layer.head_dim) == (2, 64)
    assert layer.compute_log_a(torch.randn(1, 3, 128)).shape == (1, 3, 2, 64)
    assert GateLoop(128, head_dim=64, decay="head").compute_log_a(torch.randn(1, 3, 128)).shape == (1, 3, 2, 1)
    _, state = GateLoop(128, head_dim=64)(torch.randn(1, 5, 128))
    assert state.shape == (1, 2, 64, 64) and state.is_complex()


@pytest.mark.parametrize("transition", ["data", "fixed"])
def test_lr_scale_on_transition_parameters(transition):
    layer = GateLoop(D, head_dim=4, transition=transition, transition_lr_scale=0.25).double()
    expected = {"data": {"W_alpha", "b_alpha", "W_beta", "b_beta"}, "fixed": {"alpha", "beta"}}[transition]
    scaled = {n for n, p in layer.named_parameters() if hasattr(p, "lr_scale")}
    assert scaled == expected
    assert all(getattr(layer, n).lr_scale == 0.25 for n in expected)
    copied = copy.deepcopy(layer)  # e.g. an EMA copy: the tags must survive
    assert {n for n, p in copied.named_parameters() if getattr(p, "lr_scale", 1.0) == 0.25} == expected


def test_initialisation_has_long_spread_memory():
    layer = GateLoop(64, head_dim=8, decay="channel")
    r = torch.sigmoid(layer.b_alpha.detach()).view(layer.n_heads, layer.n_decay)
    assert r.min() >= 0.9 - 1e-6 and r.max() <= 0.999 + 1e-6
    assert r.min() < 0.91 and r.max() > 0.998  # the whole ring is used
    assert (r.max(dim=1).values - r.min(dim=1).values > 0.05).all()  # every head spans a range
    beta = layer.b_beta.detach()
    assert beta.min() >= 0 and beta.max() <= math.pi / 10
    assert layer.W_alpha.abs().max() < 0.1


def test_fixed_transition_ignores_x_and_data_transition_does_not():
    x1, x2 = torch.randn(2, 2, 7, D).unbind(0)
    fixed = GateLoop(D, head_dim=4, transition="fixed")
    la1, la2 = fixed.compute_log_a(x1), fixed.compute_log_a(x2)
    assert torch.equal(la1, la2)
    assert torch.equal(la1[:, 0:1].expand_as(la1), la1)  # the same at every step too
    data = GateLoop(D, head_dim=4, transition="data")
    assert not torch.allclose(data.compute_log_a(x1), data.compute_log_a(x2))
    none = GateLoop(D, transition="none", use_complex=False)
    assert torch.equal(none.compute_log_a(x1), torch.zeros(2, 7, D, 1))


def test_log_a_is_stable_and_matches_the_definition():
    layer = GateLoop(D, head_dim=4).double()
    with torch.no_grad():
        layer.b_alpha.copy_(torch.linspace(-800, 800, layer.b_alpha.numel()))  # sigma saturates
    x = torch.randn(1, 3, D, dtype=torch.float64)
    log_a = layer.compute_log_a(x)
    assert torch.isfinite(torch.view_as_real(log_a)).all() and (log_a.real <= 0).all()
    small = GateLoop(D, head_dim=4).double()
    alpha = x @ small.W_alpha.T + small.b_alpha
    beta = x @ small.W_beta.T + small.b_beta
    a = torch.sigmoid(alpha) * torch.exp(1j * beta)
    assert_close_rms(torch.exp(small.compute_log_a(x)).reshape(1, 3, -1), a, what="a_t")


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="parallel"), "mode"),
    (dict(head_dim=3), "head_dim"),
    (dict(head_dim=0), "head_dim"),
    (dict(decay="token"), "decay"),
    (dict(transition="learned"), "transition"),
    (dict(transition="none"), "use_complex"),
    (dict(transition_lr_scale=0.0), "transition_lr_scale"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(r_min=0.99, r_max=0.9), "r_min"),
    (dict(r_max=1.0), "r_max"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GateLoop(D, **kwargs)


def test_bad_state_shape_raises():
    layer = GateLoop(D, head_dim=4)
    with pytest.raises(ValueError, match="initial_state"):
        layer(torch.randn(1, 3, D), torch.zeros(1, 2, 4, 5, dtype=torch.complex64))


@pytest.mark.parametrize("device,head_dim,per_channel,fused,expected", [
    ("cpu", 1, True, True, "scan"), ("cpu", 1, False, False, "scan"), ("cuda", 1, True, False, "scan"),
    ("cpu", 16, True, True, "scan"), ("cpu", 64, True, True, "scan"),
    ("cpu", 16, True, False, "scan"), ("cpu", 32, True, False, "chunk"), ("cpu", 64, True, False, "chunk"),
    ("cuda", 16, True, False, "chunk"), ("cuda", 64, True, True, "chunk"),
    ("cpu", 16, False, True, "scan"), ("cpu", 32, False, True, "chunk"), ("cpu", 64, False, True, "chunk"),
    ("cpu", 16, False, False, "chunk"), ("cuda", 64, False, False, "chunk"),
])
def test_pick_mode_follows_the_measurements(device, head_dim, per_channel, fused, expected):
    """The choice of mode=None (docs/performance.md, "Which mode mode=None picks"), not its timings."""
    assert pick_mode(device, head_dim, per_channel, fused) == expected


@pytest.mark.parametrize("device,head_dim,per_channel,fused,expected", [
    ("cpu", 16, False, True, "scan"), ("cpu", 32, False, True, "scan"), ("cpu", 64, False, True, "chunk"),
    ("cpu", 16, False, False, "chunk"), ("cuda", 16, False, False, "chunk"), ("cpu", 64, True, True, "scan"),
])
def test_pick_mode_without_gradients(device, head_dim, per_channel, fused, expected):
    """Forward only, the scan kernel keeps the final state alone: it wins up to head_dim 32."""
    assert pick_mode(device, head_dim, per_channel, fused, grad=False) == expected


def test_the_layer_asks_for_the_mode_with_its_grad_mode(monkeypatch):
    seen = []
    monkeypatch.setattr(GateLoop, "auto_mode", lambda self, device, grad=True: seen.append(grad) or "chunk")
    layer = GateLoop(D, head_dim=4, decay="head")
    x = torch.randn(B, T, D)
    layer(x)
    with torch.no_grad():
        layer(x)
    assert seen == [True, False]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("opts,with_kernel,without", [
    (dict(head_dim=1), "scan", "scan"),
    (dict(head_dim=4, decay="channel"), "scan", "scan"),
    (dict(head_dim=32, d_model=64, decay="channel"), "scan", "chunk"),
    (dict(head_dim=4, decay="channel", transition="none", use_complex=False), "scan", "chunk"),  # log_a [.., 1]
    (dict(head_dim=4, decay="head"), "scan", "chunk"),
    (dict(head_dim=32, d_model=64, decay="head"), "chunk", "chunk"),
])
def test_auto_mode_reads_the_layer_and_the_kernels(opts, with_kernel, without, fused, monkeypatch):
    monkeypatch.setattr(gateloop_layer, "fused_scan_available", lambda x: fused)
    layer = GateLoop(**{"d_model": D, **opts})
    assert layer.auto_mode(torch.device("cpu")) == (with_kernel if fused else without)
