"""The LSTM mixer: parameters per variant, the NP layer against torch.nn.LSTM, the output projection,
the initialisation, the state (split sequences and token-by-token for every variant, gradients into
the initial state) and bad options. The generic mixer contract runs in test_mixer_invariants.py."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rms

from gateloop.layers.lstm import LSTM
from gateloop.ops.lstm import VARIANTS

D, B, T = 8, 2, 11


def inputs(seed=1, dtype=torch.float64):
    return torch.randn(B, T, D, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameters_per_variant(variant):
    layer = LSTM(D, variant=variant, hidden_size=6)
    G = {"NIG": 3, "NFG": 3, "NOG": 3, "CIFG": 3}.get(variant, 4)
    P = {"NP": 0, "NIG": 2, "NFG": 2, "NOG": 2, "CIFG": 2}.get(variant, 3)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    expected = {"W.weight": (G * 6, D), "W.bias": (G * 6,), "R": (G * 6, 6), "W_out.weight": (D, 6)}
    expected |= {"p": (P, 6)} if P else {}
    expected |= {"R_gates": (18, 18)} if variant == "FGR" else {}
    assert shapes == expected


def test_np_layer_equals_torch_lstm():
    torch.manual_seed(0)
    layer = LSTM(D, variant="NP").double()
    ref = torch.nn.LSTM(D, D, batch_first=True).double()
    with torch.no_grad():
        layer.W.weight.copy_(ref.weight_ih_l0)
        layer.W.bias.copy_(ref.bias_ih_l0 + ref.bias_hh_l0)
        layer.R.copy_(ref.weight_hh_l0)
    assert layer.W_out is None  # hidden_size = d_model: the cells' output is the mixer's output
    x = inputs()
    y, (h, c) = layer(x)
    y_ref, (h_ref, c_ref) = ref(x)
    for what, a, e in [("y", y, y_ref), ("h", h, h_ref[0]), ("c", c, c_ref[0])]:
        assert_close_rms(a, e, what=what)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_state_carries_the_sequence(variant):
    """Every variant: split at any point, or one token at a time, gives the full-sequence result."""
    torch.manual_seed(0)
    layer = LSTM(D, variant=variant, hidden_size=5).double()
    x = inputs()
    y, state = layer(x)
    assert y.shape == (B, T, D) and len(state) == (3 if variant == "FGR" else 2)
    for t in [1, 6, T - 1]:
        y1, s1 = layer(x[:, :t])
        y2, s2 = layer(x[:, t:], s1)
        assert_close_rms(torch.cat([y1, y2], dim=1), y, what=f"split at {t}")
        for a, e in zip(s2, state, strict=True):
            assert_close_rms(a, e, what=f"state, split at {t}")
    s, ys = None, []
    for t in range(T):
        y_t, s = layer(x[:, t:t + 1], s)
        ys.append(y_t)
    assert_close_rms(torch.cat(ys, dim=1), y, what="token by token")


@pytest.mark.parametrize("variant", ["vanilla", "FGR"])
def test_gradients_reach_the_initial_state(variant):
    torch.manual_seed(0)
    layer = LSTM(D, variant=variant).double()
    _, state = layer(inputs(seed=2))
    state = tuple(s.detach().requires_grad_() for s in state)
    y, new_state = layer(inputs(), state)
    (y.square().sum() + sum(s.sum() for s in new_state)).backward()
    for s in state:
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().max() > 0


@pytest.mark.parametrize("variant", ["vanilla", "CIFG", "FGR"])
def test_modes_agree(variant):
    """mode="bptt" (the default) and "recurrent" (the reference): same outputs, states, gradients."""
    torch.manual_seed(0)
    layer = LSTM(D, variant=variant, hidden_size=6).double()
    x = inputs().requires_grad_()
    results = {}
    for mode in ("bptt", "recurrent"):
        layer.mode = mode
        y, state = layer(x)
        loss = y.square().sum() + state[1].sum()
        results[mode] = (y, *state, *torch.autograd.grad(loss, [x, *layer.parameters()]))
    assert LSTM(D).mode == "bptt"
    for j, (a, e) in enumerate(zip(results["bptt"], results["recurrent"], strict=True)):
        assert_close_rms(a, e, what=f"output, state or gradient {j}")


def test_initialisation():
    layer = LSTM(D, n_layers=4, hidden_size=6, forget_bias=2.0)
    bias = layer.W.bias.detach().view(4, 6)  # blocks i, f, z, o
    bound = 6 ** -0.5
    assert (bias[1] >= 2 - bound).all() and (bias[1] <= 2 + bound).all()
    assert bias[[0, 2, 3]].abs().max() <= bound and layer.R.abs().max() <= bound
    assert layer.p.abs().max() <= bound
    # CIFG (f = 1 - i) takes the forget bias off the input gate: f starts in the same place.
    cifg = LSTM(D, variant="CIFG", hidden_size=6, forget_bias=2.0).W.bias.detach().view(3, 6)
    assert (cifg[0] <= -2 + bound).all()
    # The output projection gets the GPT-2 scaling 1 / sqrt(2 n_layers) of nn.Linear's bound 1/sqrt(6).
    assert layer.W_out.weight.abs().max() <= bound / 8 ** 0.5


def test_float32_state_under_bfloat16_autocast():
    layer = LSTM(D, variant="CIFG", hidden_size=12)
    x = inputs(dtype=torch.float32)
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, state = layer(x)
    assert all(s.dtype == torch.float32 for s in state)
    assert_close_rms(y16.float(), y32, tol=5e-2, what="bfloat16 autocast")


@pytest.mark.parametrize("opts,match", [
    ({"variant": "vanila"}, "variant"), ({"variant": "np"}, "variant"), ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": 4.0}, "hidden_size"), ({"forget_bias": float("nan")}, "forget_bias"),
    ({"mode": "scan"}, "mode"),
])
def test_bad_options_raise(opts, match):
    with pytest.raises(ValueError, match=match):
        LSTM(D, **opts)
