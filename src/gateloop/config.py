"""Run configuration: typed dataclasses, filled from TOML files and `--set key=value` overrides.

    cfg = load_config("my.toml", ["model.d_model=128", "train.steps=500"])

Keys are grouped as model.*, data.*, train.* (and model.mixer_options.* for the mixer's own
options). An unknown key, a wrong type or an out-of-range number raises UserError naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .models.config import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataConfig:
    """Where the text comes from and how it is tokenised and split.

    corpus: "shakespeare" (the default when path is unset too), "sotu", or "hf:<dataset>[:<config>]".
    path: a local text file or folder instead of a corpus.
    """

    corpus: str | None = None
    path: str | None = None
    tokenizer: str = "byte"  # "byte" or "bpe" (trained on the train split)
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05
    test_fraction: float = 0.05


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 200
    eval_tokens: int = 65536  # validation tokens per evaluation (the whole split if smaller)
    log_every: int = 10
    checkpoint_every: int = 200
    dtype: str = "float32"  # or "bfloat16" (autocast; recurrences still accumulate in float32)
    device: str = "auto"  # "auto": cuda when available, else cpu
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    compile: bool = False  # torch.compile the training step's model (eager if compilation fails)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        cfg = apply(cls(), d)
        validate(cfg)
        return cfg


# Ranges checked after every override: (section, field) -> (test, what it must be).
_POSITIVE = lambda x: x > 0  # noqa: E731
_NON_NEGATIVE = lambda x: x >= 0  # noqa: E731
_FRACTION = lambda x: 0 < x < 1  # noqa: E731
RULES = {
    ("train", "steps"): (_POSITIVE, "positive"),
    ("train", "batch_size"): (_POSITIVE, "positive"),
    ("train", "seq_len"): (_POSITIVE, "positive"),
    ("train", "lr"): (_POSITIVE, "positive"),
    ("train", "min_lr_ratio"): (lambda x: 0 <= x <= 1, "in [0, 1]"),
    ("train", "warmup_steps"): (_NON_NEGATIVE, "non-negative"),
    ("train", "weight_decay"): (_NON_NEGATIVE, "non-negative"),
    ("train", "grad_clip"): (_NON_NEGATIVE, "non-negative (0 disables clipping)"),
    ("train", "eval_every"): (_POSITIVE, "positive"),
    ("train", "eval_tokens"): (_POSITIVE, "positive"),
    ("train", "log_every"): (_POSITIVE, "positive"),
    ("train", "checkpoint_every"): (_POSITIVE, "positive"),
    ("train", "threads"): (_NON_NEGATIVE, "non-negative"),
    ("train", "dtype"): (lambda x: x in ("float32", "bfloat16"), "float32 or bfloat16"),
    # Not MPS: RoPE, FoX's decay sums and GateLoop's attention mode compute in float64, which it lacks.
    ("train", "device"): (lambda x: x == "auto" or x.split(":")[0] in ("cpu", "cuda"),
                          "auto, cpu or cuda[:N] (MPS has no float64, which some mixers need)"),
    ("data", "tokenizer"): (lambda x: x in ("byte", "bpe"), "byte or bpe"),
    ("data", "bpe_vocab_size"): (lambda x: x >= 257, "at least 257"),
    ("data", "val_fraction"): (_FRACTION, "in (0, 1)"),
    ("data", "test_fraction"): (_FRACTION, "in (0, 1)"),
}


def validate(cfg: RunConfig) -> None:
    for (section, name), (ok, what) in RULES.items():
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise UserError(f"{section}.{name} must be {what}, got {value!r}")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise UserError("data.val_fraction + data.test_fraction must be below 1")
    if cfg.data.corpus is not None and cfg.data.path is not None:
        raise UserError("set data.corpus or data.path, not both")
    try:
        cfg.model.validate()
    except ValueError as e:
        raise UserError(str(e)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                base: RunConfig | None = None) -> RunConfig:
    """base (default: the defaults), then the TOML file (if any), then each `key=value` override, validated."""
    cfg = copy.deepcopy(base) if base is not None else RunConfig()
    apply(cfg, read_toml(path) if path is not None else {}, overrides)
    validate(cfg)
    return cfg


# The machinery below serves any config made of sections (dataclasses) of typed fields, such as
# RunConfig here and TaskRunConfig in tasks.py: keys are "section.field".

def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None


def apply(cfg, data: dict[str, Any], overrides: list[str] = ()):
    """Set the nested table data ({"model": {"d_model": 1}}), then each `key=value`, on cfg; returns
    cfg. Each value is type-checked (UserError naming the key); ranges are the caller's to validate."""
    for key, value in flatten(data):
        assign(cfg, key, value)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r}")
        assign(cfg, key.strip(), parse_value(raw.strip()))
    return cfg


def flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """{"model": {"d_model": 1}} -> [("model.d_model", 1)]; mixer_options stays one dict value."""
    out = []
    for key, value in d.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and full != "model.mixer_options":
            out += flatten(value, full + ".")
        else:
            out.append((full, value))
    return out


def parse_value(raw: str) -> Any:
    """A --set value read as a TOML literal (1, 0.5, true, "x", [1, 2]); anything else is a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def assign(cfg, key: str, value: Any) -> None:
    """cfg.<section>.<field> = value, type-checked; model.mixer_options.<name> sets one mixer option."""
    parts = key.split(".")
    if parts[:2] == ["model", "mixer_options"]:
        if len(parts) == 2:
            if not isinstance(value, dict):
                raise UserError(f"model.mixer_options must be a table, got {value!r}")
            cfg.model.mixer_options = dict(value)
        else:
            cfg.model.mixer_options[".".join(parts[2:])] = value
        return
    sections = [f.name for f in dataclasses.fields(cfg)]
    if len(parts) != 2 or parts[0] not in sections:
        examples = ", ".join(f"{s}.{dataclasses.fields(getattr(cfg, s))[0].name}" for s in sections)
        raise UserError(f"unknown config key {key!r}: keys look like {examples}")
    section = getattr(cfg, parts[0])
    fields = {f.name: f for f in dataclasses.fields(section)}
    if parts[1] not in fields:
        raise UserError(f"unknown config key {key!r}; {parts[0]}.* keys are: {', '.join(fields)}")
    hint = typing.get_type_hints(type(section))[parts[1]]
    setattr(section, parts[1], coerce(key, value, hint))


def coerce(key: str, value: Any, hint: Any) -> Any:
    """value checked against the field's type: ints widen to floats, "none" clears optional fields."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in args if a is not type(None))
    if optional and (value is None or value == "none"):
        return None
    if typing.get_origin(hint) is dict:
        hint = dict
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise UserError(f"{key} expects an integer, got {value!r}")
    if not isinstance(value, hint):
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a table"}
        raise UserError(f"{key} expects {names.get(hint, hint.__name__)}, got {value!r}")
    return value
