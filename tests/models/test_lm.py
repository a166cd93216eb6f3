"""The language model: state continuation, generation against one full pass, constant-memory state."""

import pytest
import torch
from conftest import assert_close_rms

from gateloop.layers import MIXERS, state_tensors
from gateloop.models import LanguageModel, ModelConfig, sample

def tiny(mixer="gateloop", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(mixer=mixer, vocab_size=11, d_model=16, n_layers=2,
                      mixer_options=kw.pop("mixer_options", MIXERS[mixer].test_options[0]), **kw)
    return LanguageModel(cfg).double().eval()


@pytest.mark.parametrize("mixer", sorted(MIXERS))
@torch.no_grad()
def test_continuing_from_the_state_equals_one_pass(mixer):
    model = tiny(mixer)
    tokens = torch.randint(0, 11, (2, 30), generator=torch.Generator().manual_seed(1))
    full, _ = model(tokens)
    first, state = model(tokens[:, :13])
    second, _ = model(tokens[:, 13:], state)
    assert_close_rms(torch.cat([first, second], 1), full, torch.float64)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_generation_sees_the_logits_of_one_full_pass(mixer):
    model = tiny(mixer)
    prompt = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(2))
    out, seen = model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(3),
                               return_logits=True)
    assert out.shape == (2, 19) and torch.equal(out[:, :7], prompt)
    with torch.no_grad():
        full, _ = model(out[:, :-1])
    assert_close_rms(seen, full[:, 6:], torch.float64)


def test_greedy_and_top_k_sampling():
    model = tiny()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    greedy = model.generate(prompt, 5, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 5, temperature=0))
    out, seen = model.generate(prompt, 20, top_k=1, return_logits=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0, 3:], seen[0].argmax(-1))  # top-1 sampling is greedy
    assert model.generate(prompt, 0).shape == (1, 3)


ATTENTION = {"transformer", "fox"}  # their state is a KV cache: it grows by one entry per token


@pytest.mark.parametrize("mixer", sorted(MIXERS))
@torch.no_grad()
def test_state_memory_does_not_grow_with_context_for_recurrent_mixers(mixer):
    model = tiny(mixer)
    sizes = [sum(t.numel() for t in state_tensors(model(torch.zeros(1, T, dtype=torch.long))[1])) for T in (10, 200)]
    assert sizes[0] > 0 and (sizes[1] > sizes[0]) == (mixer in ATTENTION), sizes


@pytest.mark.parametrize("options", [dict(norm="post", mlp="gelu"), dict(mlp="none", tie_embeddings=False),
                                     dict(mlp_expansion=2.0)])
def test_block_variants_train(options):
    model = tiny(**options).float().train()
    tokens = torch.randint(0, 11, (2, 9))
    logits, _ = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert (model.head.weight is model.embed.weight) == options.get("tie_embeddings", True)


def test_bad_config_and_tokens_are_named():
    with pytest.raises(ValueError, match="mixer"):
        LanguageModel(ModelConfig(mixer="nope"))
    with pytest.raises(ValueError, match="norm"):
        LanguageModel(ModelConfig(norm="middle"))
    with pytest.raises(ValueError, match="tokens"):
        tiny()(torch.zeros(3, dtype=torch.long))


def test_generating_no_tokens_returns_the_prompt_and_empty_logits():
    model = tiny("gateloop")
    prompt = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    out, seen = model.generate(prompt, 0, return_logits=True)
    assert torch.equal(out, prompt) and seen.shape == (2, 0, model.cfg.vocab_size)


def test_top_p_keeps_the_fewest_tokens_reaching_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)  # probabilities .644 .237 .087 .032
    g = torch.Generator().manual_seed(0)
    drawn = sample(logits, 1.0, None, g, top_p=0.7).flatten()
    assert set(drawn.tolist()) == {0, 1}  # .644 < .7, so the second joins; .881 >= .7, so the third does not
    assert (drawn == 0).float().mean().item() == pytest.approx(0.644 / 0.881, abs=0.04)
    assert set(sample(logits, 1.0, None, g, top_p=0.5).flatten().tolist()) == {0}  # the most likely always stays
    assert set(sample(logits, 1.0, None, g, top_p=1.0).flatten().tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        tiny().generate(torch.zeros(1, 2, dtype=torch.long), 3, top_p=0.0)


def test_stream_yields_what_generate_returns():
    model = tiny("hgrn")
    prompt = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(0))
    steps = list(model.stream(prompt, 6, temperature=0.9, top_p=0.8, generator=torch.Generator().manual_seed(1)))
    out = model.generate(prompt, 6, temperature=0.9, top_p=0.8, generator=torch.Generator().manual_seed(1))
    assert len(steps) == 6 and torch.equal(torch.cat([prompt, *[t for t, _ in steps]], 1), out)
