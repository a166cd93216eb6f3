"""The minGRU / minLSTM mixers: the scan and blocked modes equal the recurrent mode (outputs, states,
every gradient), state shapes and dtypes, options. The mixer contract itself runs in test_mixer_invariants.py."""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_close_rms

from gateloop.layers.min_rnn import MinGRU, MinLSTM

MIXER_CLASSES = {"mingru": MinGRU, "minlstm": MinLSTM}
OPTIONS = [{}, {"expansion": 2.0}, {"use_g": False}, {"expansion": 1.5, "bias": False, "chunk_size": 4}]


def grads_of(mixer, x, state):
    """Output, new state and the gradients of a fixed functional w.r.t. parameters, x and the state."""
    mixer.zero_grad(set_to_none=True)
    x, state = x.clone().requires_grad_(), state.clone().requires_grad_()
    y, new_state = mixer(x, state)
    gen = torch.Generator().manual_seed(7)
    w_y, w_s = (torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (y, new_state))
    ((y * w_y).sum() + (new_state * w_s).sum()).backward()
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    return y.detach(), new_state.detach(), grads | {"x": x.grad, "state": state.grad}


@pytest.mark.parametrize("opts", OPTIONS, ids=[str(i) for i in range(len(OPTIONS))])
@pytest.mark.parametrize("mode", ["scan", "blocked"])
@pytest.mark.parametrize("name", list(MIXER_CLASSES))
def test_parallel_modes_equal_recurrent_mode(name, mode, opts):
    torch.manual_seed(0)
    scan = MIXER_CLASSES[name](16, mode=mode, **opts).double()
    loop = MIXER_CLASSES[name](16, mode="recurrent", **opts).double()
    loop.load_state_dict(scan.state_dict())
    x = torch.randn(2, 37, 16, dtype=torch.float64)
    state = torch.randn(2, scan.d_inner, dtype=torch.float64)  # signed, though g's states are positive
    y, s, grads = grads_of(scan, x, state)
    y_ref, s_ref, grads_ref = grads_of(loop, x, state)
    assert_close_rms(y, y_ref, torch.float64, what="output")
    assert_close_rms(s, s_ref, torch.float64, what="state")
    for n in grads_ref:
        assert_close_rms(grads[n], grads_ref[n], torch.float64, what=f"grad {n}")


@pytest.mark.parametrize("name", list(MIXER_CLASSES))
def test_state_shape_dtype_and_sign(name):
    mixer = MIXER_CLASSES[name](16, expansion=2.0)
    y, state = mixer(torch.randn(3, 10, 16))
    assert y.shape == (3, 10, 16) and state.shape == (3, 32) and state.dtype == torch.float32
    assert (state > 0).all()  # g keeps states positive from the zero state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, state16 = mixer(torch.randn(3, 10, 16), state)
    assert y16.dtype == torch.bfloat16 and state16.dtype == torch.float32


@pytest.mark.parametrize("name,gates", [("mingru", 1), ("minlstm", 2)])
def test_parameter_count(name, gates):
    d, e = 16, 2.0
    mixer = MIXER_CLASSES[name](d, expansion=e)
    d_inner = int(d * e)
    assert sum(p.numel() for p in mixer.parameters()) == (gates + 1) * (d * d_inner + d_inner) + d_inner * d


@pytest.mark.parametrize("bad", [{"mode": "chunk"}, {"expansion": 0.0}, {"expansion": 0.01},
                                 {"chunk_size": 0}])
@pytest.mark.parametrize("name", list(MIXER_CLASSES))
def test_bad_options_are_named(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MIXER_CLASSES[name](16, **bad)


def test_registered():
    from gateloop.layers import MIXERS

    assert MIXERS["mingru"] is MinGRU and MIXERS["minlstm"] is MinLSTM


def test_float32_scan_tracks_float64_on_a_long_sequence():
    torch.manual_seed(0)
    mixer = MinLSTM(16).double()
    x = torch.randn(1, 1000, 16, dtype=torch.float64)
    y64, s64 = mixer(x)
    y32, s32 = mixer.float()(x.float())
    assert_close_rms(y32, y64, tol=TOL[torch.float32], what="output")
    assert_close_rms(s32, s64, tol=TOL[torch.float32], what="state")
