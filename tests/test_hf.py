"""gateloop in transformers (gateloop.hf): the loss, the cache, greedy parity with `gateloop generate`
for every mixer, left padding, tokenizers, export and loading, and bad input. Tiny models throughout."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline

import gateloop.hf  # noqa: F401  (registers the auto classes)
from gateloop.checkpoint import load_run
from gateloop.cli import main
from gateloop.data import BPETokenizer, ByteTokenizer
from gateloop.errors import UserError
from gateloop.hf import GateLoopCache, GateLoopConfig, GateLoopForCausalLM, GateLoopTokenizer
from gateloop.hf.export import export_run
from gateloop.hf.modeling import PADDABLE_MIXERS
from gateloop.layers import MIXERS
from gateloop.models import LanguageModel
from hf_runs import make_run, model_config

MIXER_NAMES = sorted(MIXERS)
TEXT = "the cat sat, and 'ÿ' and é and ÿ"


def hf_model(mixer, vocab_size=11):
    torch.manual_seed(0)
    return GateLoopForCausalLM(GateLoopConfig.from_model_config(model_config(mixer, vocab_size))).double().eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """mixer -> (run directory, its export), made on first use."""
    root, made = tmp_path_factory.mktemp("hf"), {}

    def get(mixer):
        if mixer not in made:
            run = make_run(root / f"run-{mixer}", mixer)
            made[mixer] = run, export_run(run, root / f"hf-{mixer}")
        return made[mixer]
    return get


@pytest.mark.parametrize("mixer", MIXER_NAMES)
@torch.no_grad()
def test_loss_and_logits_are_the_projects(mixer):
    model = hf_model(mixer)
    ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    logits, _ = model.model(ids)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.equal(out.logits, logits)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    labels = ids.clone()
    labels[:, :4] = -100  # positions to skip, transformers' convention
    masked = torch.nn.functional.cross_entropy(logits[:, 3:-1].flatten(0, 1), ids[:, 4:].flatten())
    assert model(ids, labels=labels).loss.item() == pytest.approx(masked.item(), rel=1e-12)


@pytest.mark.parametrize("mixer", MIXER_NAMES)
@torch.no_grad()
def test_the_cache_continues_and_reorders_rows(mixer):
    model = hf_model(mixer)
    ids = torch.randint(0, 11, (3, 10), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits
    first = model(ids[:, :6], use_cache=True)
    cache = first.past_key_values
    assert isinstance(cache, GateLoopCache) and cache.get_seq_length() == 6
    second = model(ids[:, 6:], past_key_values=cache)
    assert cache.get_seq_length() == 10
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=1e-9, atol=1e-9)
    cache = model(ids[:, :6]).past_key_values
    cache.reorder_cache(torch.tensor([2, 0, 1]))  # beam search's reordering: row i continues row order[i]
    step = model(ids[[2, 0, 1], 6:7], past_key_values=cache).logits
    torch.testing.assert_close(step, full[[2, 0, 1], 6:7], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_greedy_generate_equals_gateloop_generate(mixer, exported, capsys):
    run, out = exported(mixer)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, GateLoopForCausalLM) and isinstance(tokenizer, GateLoopTokenizer)
    prompt = "the cat"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    lengths = []
    model.register_forward_pre_hook(lambda m, args, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert lengths == [len(prompt)] + [1] * 7  # the prompt once, then each new token once
    own, _, _ = load_run(run)
    assert torch.equal(tokens, own.generate(ids, 8, temperature=0))
    assert main(["generate", "--run", str(run), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tokenizer.decode(tokens[0]) + "\n"


@pytest.mark.parametrize("mixer", MIXER_NAMES)
@torch.no_grad()
def test_left_padded_batches_equal_each_prompt_alone_or_name_the_mixer(mixer):
    model = hf_model(mixer, vocab_size=256)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 255, (n,), generator=g) for n in (3, 7, 5)]
    ids = torch.full((3, 7), 255)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 7 - len(p):], mask[i, 7 - len(p):] = p, 1
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=255)
    if mixer not in PADDABLE_MIXERS:
        with pytest.raises(ValueError, match=f"mixer '{mixer}' does not support padding"):
            model.generate(ids, attention_mask=mask, **kw)
        return
    batch = model.generate(ids, attention_mask=mask, **kw)[:, 7:]
    for i, p in enumerate(prompts):
        assert torch.equal(batch[i], model.generate(p[None], **kw)[0, len(p):]), f"row {i}"


@pytest.mark.parametrize("mixer", MIXER_NAMES)
@torch.no_grad()
def test_the_paddable_table_is_the_mixers_with_fixed_size_states(mixer):
    """A mixer may take left padding only if its state has the same shapes at every length."""
    model = LanguageModel(model_config(mixer, vocab_size=11))

    def signature(state):  # the shapes without the batch dimension, and any non-tensor leaves
        if isinstance(state, torch.Tensor):
            return tuple(state.shape[1:])
        if isinstance(state, dict):
            return {k: signature(v) for k, v in state.items()}
        if isinstance(state, (list, tuple)):
            return [signature(s) for s in state]
        return state

    sizes = [signature(model(torch.zeros(2, T, dtype=torch.long))[1]) for T in (3, 5)]
    assert (sizes[0] == sizes[1]) == (mixer in PADDABLE_MIXERS), sizes


def test_padding_errors_are_clear():
    model = hf_model("gateloop")
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="pad on the left"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="row of zeros"):
        model(ids, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    cache = model(ids).past_key_values
    with pytest.raises(ValueError, match="first call"):
        model(ids[:, :1], past_key_values=cache, attention_mask=torch.tensor([[1] * 4 + [0], [1] * 5]))


def test_sampling_options_streamer_and_pipeline(exported, capsys):
    _, out = exported("gateloop")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=20, do_sample=True, top_p=0.9, top_k=0, temperature=1.0,
                             repetition_penalty=1.3)
    assert sampled.shape == (1, 27) and torch.equal(sampled[:, :7], ids)
    torch.manual_seed(0)  # the same draw again: sampling is reproducible through the cache
    assert torch.equal(sampled, model.generate(ids, max_new_tokens=20, do_sample=True, top_p=0.9, top_k=0,
                                               repetition_penalty=1.3))
    capsys.readouterr()
    greedy = model.generate(ids, max_new_tokens=15, do_sample=False, streamer=TextStreamer(tokenizer))
    assert capsys.readouterr().out == tokenizer.decode(greedy[0]) + "\n"
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = pipe("the cat", max_new_tokens=15, do_sample=False)[0]["generated_text"]
    assert text == tokenizer.decode(greedy[0])


@pytest.mark.parametrize("mixer", ["gateloop", "transformer"])
def test_beam_search_through_the_cache_equals_it_without(mixer, exported):
    model = AutoModelForCausalLM.from_pretrained(exported(mixer)[1])
    ids = torch.tensor([list(b"the cat")])
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


def test_byte_tokenizer_gives_gateloops_ids_and_a_prefix_id_text_never_yields(tmp_path):
    tok = GateLoopTokenizer(kind="byte")
    ids = tok(TEXT).input_ids
    assert ids == ByteTokenizer().encode(TEXT) and 255 not in ids  # 'ÿ' in the text is bytes C3 BF
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == tok.prefix_token_id == 255
    assert tok.decode(ids) == TEXT and tok.decode([255, *ids], skip_special_tokens=True) == TEXT
    batch = tok(["ab", "abcd"], padding=True)  # on the left, with the prefix id, for generate
    assert batch.input_ids[0] == [255, 255, 97, 98] and batch.attention_mask[0] == [0, 0, 1, 1]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(again, GateLoopTokenizer) and again(TEXT).input_ids == ids and again.eos_token_id == 255


def test_bpe_tokenizer_gives_gateloops_ids(corpus, tmp_path):
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    bpe = BPETokenizer.train(texts, vocab_size=300)
    bpe.save(tmp_path / "tokenizer.json")
    tok = GateLoopTokenizer(bpe_file=str(tmp_path / "tokenizer.json"), kind="bpe")
    sample = texts[0][:200] + TEXT
    ids = tok(sample).input_ids
    assert ids == bpe.encode(sample) and tok.prefix_token_id not in ids
    assert tok.eos_token_id == tok.prefix_token_id == tok.convert_tokens_to_ids("ÿ") and tok.vocab_size == 300
    assert tok.decode(ids) == bpe.decode(ids) == sample
    tok.save_pretrained(tmp_path / "hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(sample).input_ids == ids


def test_export_files_and_round_trip(exported, tmp_path):
    run, out = exported("hgrn")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gateloop" and config["mixer"] == "hgrn" and "auto_map" not in config
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    own, _, _ = load_run(run)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, own(ids)[0])
        model.save_pretrained(tmp_path / "again")
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "again")(ids).logits, own(ids)[0])


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_round_trips_tied_and_untied_heads(tied, tmp_path):
    cfg = model_config("hgrn", n_layers=1)
    cfg.tie_embeddings = tied
    model = GateLoopForCausalLM(GateLoopConfig.from_model_config(cfg)).eval()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert (again.model.head.weight is again.model.embed.weight) == tied


def test_export_never_overwrites_and_cli_errors(exported, tmp_path, capsys):
    run, out = exported("gateloop")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["export", "--run", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new" / "model.safetensors").exists()


@pytest.mark.parametrize("edit,needle", [
    ({"mixer": "nope"}, "mixer 'nope' is not one of the package's mixers"),
    ({"mixer": "os:system"}, "mixer 'os:system' is not one of the package's mixers"),  # never imported
    ({"d_model": 32}, "do not match config.json"),
    ({"n_layers": 3}, "do not match config.json"),
    ({"mixer_options": {"head_dim": 7}}, "head_dim"),
    ({"mixer_options": "x"}, "mixer_options"),
])
def test_a_tampered_config_is_a_clear_error(exported, tmp_path, edit, needle):
    _, out = exported("transformer")
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in out.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    config = json.loads((out / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(UserError, match=needle):
        AutoModelForCausalLM.from_pretrained(bad)


def test_missing_weights_are_an_error_not_random_init(exported, tmp_path):
    _, out = exported("transformer")
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in out.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    weights = safetensors.torch.load_file(out / "model.safetensors")
    weights.pop(sorted(k for k in weights if "W_q" in k)[0])
    safetensors.torch.save_file(weights, bad / "model.safetensors")
    with pytest.raises(UserError, match="missing_keys"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_the_core_package_does_not_import_transformers():
    code = ("import sys, gateloop, gateloop.cli; gateloop.cli.build_parser(); "
            "assert 'transformers' not in sys.modules and 'gateloop.hf' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_without_transformers_names_the_install(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'gateloop[hf]'" in capsys.readouterr().err
