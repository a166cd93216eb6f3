"""Run configuration: TOML files, --set overrides, types and ranges, each error naming its key."""

import pytest

from gateloop.config import RunConfig, load_config
from gateloop.errors import UserError


def test_defaults_and_overrides_by_type():
    cfg = load_config(None, ["model.d_model=64", "train.lr=1e-3", "train.lr=2", "data.corpus=sotu",
                             "model.tie_embeddings=false", "model.mixer_options.head_dim=16",
                             "model.mixer_options.mode=scan"])
    assert cfg.model.d_model == 64 and cfg.train.lr == 2.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.corpus == "sotu" and cfg.model.tie_embeddings is False
    assert cfg.model.mixer_options == {"head_dim": 16, "mode": "scan"}


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nmixer = "transformer"\nd_model = 32\n[model.mixer_options]\nhead_dim = 8\n'
                    '[train]\nsteps = 5\n')
    cfg = load_config(path, ["train.steps=7"])
    assert (cfg.model.mixer, cfg.model.d_model, cfg.train.steps) == ("transformer", 32, 7)
    assert cfg.model.mixer_options == {"head_dim": 8}


def test_round_trip_through_a_dict():
    cfg = load_config(None, ["model.mixer=hgrn", "data.path=/x", "train.steps=3"])
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override,needle", [
    ("model.nope=1", "model.nope"), ("nope.x=1", "nope.x"), ("train=1", "train"),
    ("train.steps=abc", "train.steps expects an integer"), ("train.steps=1.5", "train.steps"),
    ("train.steps=true", "train.steps"), ("train.lr=fast", "train.lr expects a number"),
    ("train.steps=0", "train.steps must be positive"), ("train.lr=-1", "train.lr"),
    ("data.val_fraction=1.5", "data.val_fraction"), ("train.dtype=float16", "train.dtype"),
    ("model.mixer=nope", "unknown mixer 'nope'"), ("data.tokenizer=words", "data.tokenizer"),
    ("model.tie_embeddings=1", "model.tie_embeddings expects true or false"), ("train.steps", "key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)
    bad.write_text("[model]\nd_model = 'big'\n")
    with pytest.raises(UserError, match="model.d_model"):
        load_config(bad)
