"""Bad input, generated with hypothesis: config files and --set values (unknown keys, wrong types,
out-of-range numbers), token ids outside the vocabulary, empty or binary data files, prompts longer than
anything seen. Each gets one clear line on stderr and exit code 2 (or, for the long prompt, works),
and no existing run directory is altered."""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateloop import MIXERS
from gateloop import checkpoint as ckpt
from gateloop.cli import main
from gateloop.config import RULES, RunConfig, load_config
from gateloop.errors import UserError
from gateloop.models import LanguageModel, ModelConfig

TINY = {"model.d_model": 16, "model.n_layers": 1, "train.steps": 2, "train.batch_size": 2, "train.seq_len": 16,
        "train.eval_tokens": 64, "train.warmup_steps": 1, "train.threads": 1}
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def sets(settings_: dict) -> list[str]:
    return [a for k, v in settings_.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--out", str(out), *sets({**TINY, "data.path": corpus}), "--no-progress"]) == 0
    return out


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def one_line_error(capsys, argv) -> str:
    """Run the CLI; assert exit code 2 and exactly one line on stderr; return that line."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, code, err)
    assert len(err.splitlines()) == 1 and err.startswith("gateloop: error: ") and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- bad config values

FIELDS = {f"{section}.{f.name}": typing.get_type_hints(type(getattr(RunConfig(), section)))[f.name]
          for section in ("model", "data", "train") for f in dataclasses.fields(getattr(RunConfig(), section))
          if f.name != "mixer_options"}
identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)


def toml(value) -> str:
    """value as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):  # control characters, quotes and backslashes escaped
        return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or c in '"\\\x7f' else c for c in value) + '"'
    return "[" + ", ".join(toml(v) for v in value) + "]"


def wrong_type(hint):
    """Values no field of this type accepts (ints do widen to floats, so they are not wrong for floats)."""
    base = typing.get_args(hint)[0] if typing.get_args(hint) else hint  # X | None -> X
    texts = st.text(max_size=6).filter(lambda s: s != "none")
    lists = st.lists(st.integers(0, 9), max_size=2)
    non_integral = st.floats(allow_nan=False).filter(lambda x: not math.isfinite(x) or x != int(x))
    return {int: st.one_of(texts, st.booleans(), non_integral, lists),
            float: st.one_of(texts, st.booleans(), lists),
            str: st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), lists),
            bool: st.one_of(st.integers(), texts, lists)}[base]


@st.composite
def bad_items(draw, sections=("model", "data", "train")):
    """(key, value, what the error must name): an unknown key, a wrong type, or an out-of-range value."""
    kind = draw(st.sampled_from(["unknown", "type", "range"]))
    if kind == "unknown":
        section = draw(st.sampled_from(sections))
        name = draw(identifiers.filter(lambda n: f"{section}.{n}" not in FIELDS))
        return f"{section}.{name}", draw(st.integers(0, 9)), f"{section}.{name}"
    keys = sorted(k for k in FIELDS if k.split(".")[0] in sections)
    if kind == "type":
        key = draw(st.sampled_from(keys))
        return key, draw(wrong_type(FIELDS[key])), key
    ranged = sorted(f"{s}.{n}" for s, n in RULES if s in sections) + [
        k for k in ("model.d_model", "model.n_layers", "model.mixer", "model.mlp", "model.norm",
                    "model.mlp_expansion") if "model" in sections]
    key = draw(st.sampled_from(ranged))
    return key, draw(out_of_range(key)), key.split(".")[1]


def out_of_range(key):
    hint = FIELDS[key]
    if key in ("model.mixer", "model.mlp", "model.norm") or hint is str:
        allowed = {"model.mixer": set(MIXERS), "model.mlp": {"swiglu", "gelu", "none"}, "model.norm": {"pre", "post"},
                   "train.dtype": {"float32", "bfloat16"}, "data.tokenizer": {"byte", "bpe"}}.get(key, set())
        if key == "train.device":  # refused by the config (see test_devices_that_do_not_exist for the rest)
            return st.sampled_from(["gpu", "tpu", "", "CPU", "auto:0"])
        return st.text(min_size=1, max_size=8).filter(lambda s: s not in allowed and s != "none")
    section, name = key.split(".")
    ok = RULES[(section, name)][0] if (section, name) in RULES else (lambda x: x > 0)
    if hint is int or key in ("model.d_model", "model.n_layers"):
        return st.integers(-2**40, 2**40).filter(lambda x: not ok(x))
    return st.one_of(st.floats(-1e9, 1e9).filter(lambda x: not ok(x)), st.sampled_from([math.nan, math.inf, -math.inf]))


@FAST
@given(item=bad_items())
def test_bad_config_files_and_sets_name_the_key(item, tmp_path_factory, capsys):
    """The same bad item as a TOML file and as --set: load_config raises a UserError naming the key,
    and `gateloop train` exits 2 with one line, creating nothing."""
    key, value, needle = item
    folder = tmp_path_factory.mktemp("cfg")
    section, _, name = key.partition(".")
    path = folder / "run.toml"
    path.write_text(f"[{section}]\n{name} = {toml(value)}\n")
    for source in ({"path": path}, {"overrides": [f"{key}={toml(value)}"]}):
        with pytest.raises(UserError) as info:
            load_config(**source)
        assert needle in str(info.value), (item, str(info.value))
    out = folder / "out"
    one_line_error(capsys, ["train", "--config", str(path), "--out", str(out), "--no-progress"])
    one_line_error(capsys, ["train", "--set", f"{key}={toml(value)}", "--out", str(out), "--no-progress"])
    assert not out.exists()


@FAST
@given(item=bad_items(sections=("train",)), other=bad_items(sections=("model", "data")))
def test_bad_sets_on_resume_leave_the_run_untouched(item, other, run, capsys):
    """`--resume RUN --set <bad train.* value>`, or any model.* / data.* key: exit 2, one line, RUN as it was."""
    before = snapshot(run)
    key, value, needle = item
    assert needle in one_line_error(capsys, ["train", "--resume", str(run), "--set", f"{key}={toml(value)}"])
    one_line_error(capsys, ["train", "--resume", str(run), "--set", f"{other[0]}={toml(other[1])}"])
    one_line_error(capsys, ["train", "--out", str(run), "--set", f"{key}={toml(value)}"])
    assert snapshot(run) == before


@pytest.mark.parametrize("device", ["cuda:x", "cpu:", "cuda:-1", "cuda:99", "mps", "meta"])
def test_devices_that_do_not_exist(device, run, capsys):
    """Devices the config's pattern lets through but this machine has not: one line, exit 2, no run made
    (and `eval --device` takes the same path)."""
    before = snapshot(run)
    err = one_line_error(capsys, ["train", "--set", f"train.device={device}", "--out", str(run.parent / "new")])
    assert device in err and not (run.parent / "new").exists()
    one_line_error(capsys, ["eval", "--run", str(run), "--device", device])
    assert snapshot(run) == before


@pytest.mark.parametrize("item", ["train.lr=inf", "train.weight_decay=inf", "model.mlp_expansion=inf",
                                  "model.mlp_expansion=nan"])
def test_non_finite_numbers_are_refused(item):
    with pytest.raises(UserError, match=item.split("=")[0]):
        load_config(None, [item])


@settings(max_examples=25, deadline=None)
@given(mixer=st.sampled_from(sorted(MIXERS)), options=st.dictionaries(
    st.one_of(identifiers, st.sampled_from(["head_dim", "chunk_size", "mode", "decay", "expand", "n_heads"])),
    st.one_of(st.integers(-3, 70), st.floats(allow_nan=True), st.text(max_size=5), st.booleans()), max_size=2))
def test_random_mixer_options_build_or_are_a_user_error(mixer, options):
    cfg = load_config(None, [f"model.mixer={mixer}", "model.d_model=16", "model.n_layers=1"])
    cfg.model.mixer_options = options
    try:
        ckpt.build_model(cfg.model)
    except UserError as e:
        assert str(e).startswith("model config: ")


@settings(max_examples=10, deadline=None)
@given(d_model=st.integers(10**6, 2**62), n_layers=st.integers(1, 2**62))
def test_models_beyond_memory_are_refused_at_once(d_model, n_layers):
    """Sizes counted on the meta device (or, past int64 sizes, refused by the allocator at once)."""
    with pytest.raises(UserError, match="model config: .*(GiB|cannot build a model this large)"):
        ckpt.build_model(ModelConfig(d_model=d_model, n_layers=n_layers))
    with pytest.raises(UserError, match="GiB"):
        ckpt.build_model(ModelConfig(d_model=16, n_layers=n_layers + 10**9))


# ----------------------------------------------------------------------------- token ids

@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(-2**40, 2**40), min_size=1, max_size=8))
def test_token_ids_outside_the_vocabulary_are_a_clear_value_error(ids):
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=11, d_model=16, n_layers=1))
    tokens = torch.tensor([ids])
    if all(0 <= i < 11 for i in ids):
        assert model(tokens)[0].shape == (1, len(ids), 11)
    else:
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 11\)"):
            model(tokens)


def test_a_tokenizer_larger_than_the_model_is_refused(run, tmp_path, capsys):
    """A run whose config gives the model fewer tokens than its tokenizer (edited by hand): the ids the
    tokenizer makes would fall outside the embedding, so eval and generate refuse it up front."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in snapshot(run).items():
        (copy / name).write_bytes(data)
    blob = json.loads((copy / ckpt.CONFIG).read_text())
    blob["model"]["vocab_size"] = 200
    (copy / ckpt.CONFIG).write_text(json.dumps(blob))
    before = snapshot(copy)
    for argv in (["eval", "--run", str(copy)], ["generate", "--run", str(copy), "--prompt", "\xff"]):
        assert "the tokenizer has 256 tokens but the model only 200" in one_line_error(capsys, argv)
    assert snapshot(copy) == before


# ----------------------------------------------------------------------------- data files

def not_text(data: bytes) -> bool:
    if b"\0" in data:
        return True
    try:
        return not data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return True


@FAST
@given(data=st.one_of(st.binary(max_size=300).filter(not_text), st.sampled_from([b"", b"\n\n \t", b"\xef\xbb\xbf"]),
                      st.binary(min_size=1, max_size=100).map(lambda b: b"text " + b + b"\0 more")))
def test_empty_or_binary_data_files_are_refused(data, tmp_path_factory, capsys):
    folder = tmp_path_factory.mktemp("data")
    for target in (folder / "data.txt", folder / "docs"):
        if target.suffix:
            target.write_bytes(data)
        else:
            target.mkdir()
            (target / "a.txt").write_bytes(data)
        err = one_line_error(capsys, ["train", "--out", str(folder / "out"), "--set", f"data.path={target}",
                                      "--no-progress"])
        assert any(w in err for w in ("empty", "binary", "not UTF-8", "no non-empty")), err
        assert not (folder / "out").exists()


# ----------------------------------------------------------------------------- prompts

@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=40, max_size=300))
def test_prompts_longer_than_the_training_windows_generate(prompt, run, capsys):
    """seq_len is 16 tokens; prompts of 40 to 1200 bytes run through the model (in parallel, then step by
    step carrying the state) and come back as the start of the output (as --prompt=TEXT, which also takes a prompt that starts
    with "-": hypothesis drew one)."""
    before = snapshot(run)
    assert main(["generate", "--run", str(run), f"--prompt={prompt}", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
    assert snapshot(run) == before


def test_a_prompt_that_is_not_utf8_is_one_line_error(run, capsys):
    one_line_error(capsys, ["generate", "--run", str(run), "--prompt", "caf\udce9"])
