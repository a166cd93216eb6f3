"""The short causal convolution on a mixer's inputs (layers/short_conv.py): the F.conv1d form against
a loop written from the definition (outputs, carried inputs, gradients), every mixer of the registry
with the option on keeps the mixer contract, the conv leaves the other parameters' draws alone,
checkpoints without it load, and the hf cache keeps left padding for the mixers with fixed-size states."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gateloop import testing
from gateloop.hf import GateLoopConfig, GateLoopForCausalLM
from gateloop.hf.modeling import PADDABLE_MIXERS
from gateloop.layers import MIXERS, state_tensors
from gateloop.layers.short_conv import ShortConv, make_short_conv
from gateloop.models import LanguageModel, ModelConfig

WIDTH = 4
CONV_CASES = {name: {**MIXERS[name].test_options[0], "short_conv": WIDTH} for name in MIXERS}


def conv_reference(weight: torch.Tensor, x: torch.Tensor, past: torch.Tensor | None = None):
    """u_t = sum_j w[:, j] x_{t - W + 1 + j}, one step at a time from the definition; the inputs
    before the first are `past` (the W - 1 before it) or zeros. Returns (u, the last W - 1 inputs)."""
    B, T, C = x.shape
    W = weight.shape[1]
    window = [x.new_zeros(B, C) for _ in range(W - 1)] if past is None else list(past.unbind(1))
    out = []
    for t in range(T):
        window.append(x[:, t])
        out.append(sum(weight[:, j] * window[len(window) - W + j] for j in range(W)))
        window = window[1:]
    return torch.stack(out, dim=1), torch.stack(window, dim=1)


def random_conv(width=WIDTH, channels=6, seed=0):
    torch.manual_seed(seed)
    conv = ShortConv(channels, width).double()
    with torch.no_grad():
        conv.weight.normal_()  # not the identity init: every tap matters
    return conv


@pytest.mark.parametrize("width", [2, 4, 7])
@pytest.mark.parametrize("T", [1, 3, 20])
def test_conv_matches_the_definition_with_and_without_carried_inputs(width, T):
    conv = random_conv(width)
    x = torch.randn(3, T, 6, dtype=torch.float64)
    past = torch.randn(3, width - 1, 6, dtype=torch.float64)
    for cache in (None, past):
        u, new_cache = conv(x, cache)
        u_ref, cache_ref = conv_reference(conv.weight, x, cache)
        testing.assert_close_rms(u, u_ref, what="output")
        assert torch.equal(new_cache, cache_ref), "the carried inputs"


def test_pieces_and_steps_equal_the_whole_sequence_with_the_same_gradients():
    conv = random_conv()
    x = torch.randn(2, 17, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 17, 6, dtype=torch.float64)

    def grads(pieces):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        cache, outs = None, []
        for a, b in zip(pieces[:-1], pieces[1:]):
            u, cache = conv(x[:, a:b], cache)
            outs.append(u)
        u = torch.cat(outs, dim=1)
        ((u * w).sum() + cache.pow(2).sum()).backward()  # the carried inputs pass gradient too
        return u.detach(), cache.detach(), conv.weight.grad.clone(), x.grad.clone()

    whole = grads([0, 17])
    u_ref, cache_ref = conv_reference(conv.weight, x)
    testing.assert_close_rms(whole[0], u_ref, what="whole sequence vs definition")
    assert torch.equal(whole[1], cache_ref)
    for pieces in ([0, 1, 17], [0, 2, 3, 9, 17], list(range(18))):  # splits inside the window, one token at a time
        for got, want, what in zip(grads(pieces), whole, ("output", "cache", "grad w", "grad x")):
            testing.assert_close_rms(got, want, what=f"{what}, pieces {pieces}")


def test_gradient_of_the_taps_is_that_of_the_definition():
    conv = random_conv()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    w = torch.randn(2, 11, 6, dtype=torch.float64)
    (conv(x)[0] * w).sum().backward()
    weight = conv.weight.detach().clone().requires_grad_(True)
    (conv_reference(weight, x)[0] * w).sum().backward()
    testing.assert_close_rms(conv.weight.grad, weight.grad, what="grad of the taps")


def test_the_option_is_off_by_default_and_checks_its_width():
    assert make_short_conv(8, 0) is None
    for bad in (1, -1, 2.5, True):
        with pytest.raises(ValueError, match="short_conv must be 0"):
            make_short_conv(8, bad)
    for name, cls in MIXERS.items():
        assert cls(16, **cls.test_options[0]).conv is None, name


@pytest.mark.parametrize("check", testing.CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_keeps_the_contract_with_the_conv_on(name, check):
    check(MIXERS[name], CONV_CASES[name])


@pytest.mark.parametrize("name", sorted(MIXERS))
@torch.no_grad()
def test_the_conv_is_built_last_and_its_state_wraps_the_mixers(name):
    """With the option on, the mixer's other parameters are drawn as without it (same seed), so a
    comparison with and without the conv starts from the same weights; Yaad's W_delta, built after
    the family's parameters, is the one exception. The state is {"conv": the last W - 1 inputs,
    "mixer": the mixer's own state}."""
    off, x = testing.build(MIXERS[name], MIXERS[name].test_options[0])
    on, _ = testing.build(MIXERS[name], CONV_CASES[name])
    weights_off, weights_on = off.state_dict(), on.state_dict()
    assert set(weights_on) - set(weights_off) == {"conv.weight"}
    for key, w in weights_off.items():
        if not (name == "yaad" and key.startswith("W_delta.")):
            assert torch.equal(weights_on[key], w), key
    state = on(x)[1]
    assert set(state) == {"conv", "mixer"}
    assert torch.equal(state["conv"], x[:, -(WIDTH - 1):])
    assert len(state_tensors(state["mixer"])) == len(state_tensors(off(x)[1]))


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_a_model_saved_without_the_option_loads_as_before(name):
    """A checkpoint of today's mixers (no `short_conv` in its options) names no conv parameter, and a
    model built from its config loads it strictly."""
    cfg = ModelConfig(mixer=name, vocab_size=11, d_model=16, n_layers=1, mixer_options=MIXERS[name].test_options[0])
    saved = LanguageModel(cfg).state_dict()
    assert not any(".conv." in k for k in saved)
    LanguageModel(cfg).load_state_dict(saved, strict=True)
    with_conv = LanguageModel(dataclasses.replace(cfg, mixer_options=CONV_CASES[name]))
    missing = with_conv.load_state_dict(saved, strict=False).missing_keys
    assert missing == ["blocks.0.mixer.conv.weight"], missing


@pytest.mark.parametrize("name", sorted(PADDABLE_MIXERS))
@torch.no_grad()
def test_left_padding_still_works_with_the_conv_on(name):
    """Prompts of unequal length, padded on the left, one of them shorter than the conv's window:
    each row generates what it generates alone."""
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=name, vocab_size=11, d_model=16, n_layers=2, mixer_options=CONV_CASES[name])
    model = GateLoopForCausalLM(GateLoopConfig.from_model_config(cfg)).double().eval()
    prompts = [torch.tensor([3, 1, 4, 1, 5, 9]), torch.tensor([2, 6]), torch.tensor([5, 3, 5, 8])]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 7 - len(p):], mask[i, 7 - len(p):] = p, 1
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=10)
    batch = model.generate(ids, attention_mask=mask, **kw)[:, 7:]
    for i, p in enumerate(prompts):
        assert torch.equal(batch[i], model.generate(p[None], **kw)[0, len(p):]), f"row {i}"
