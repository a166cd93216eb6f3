"""Tokenizers: raw UTF-8 bytes (vocab 256, no files) or a byte-level BPE trained offline.

Both share one small interface (`Tokenizer`): `name`, `vocab_size`, `encode`, `encode_batch`,
`decode`, `to_config`. The config (JSON) goes into a run's config.json as {"kind", "vocab_size"};
a BPE also needs its `tokenizer.json`, which `save_tokenizer` writes beside it in the run directory
and `load_tokenizer` reads back.

The BPE is byte level (GPT-2 style pre-tokenizer and decoder, without a prefix space), so every
string round-trips exactly and no text is ever out of vocabulary. It has no special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from gateloop.errors import UserError
from gateloop.fileio import atomic_write_bytes

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_BPE_VOCAB = 4096
TOKENIZER_KINDS = ("byte", "bpe")


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_config(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """Token = one UTF-8 byte. Decoding replaces invalid byte sequences (a model may emit them)."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # int() so that tensors and numpy arrays work as well as lists.
        return bytes([int(i) for i in ids]).decode("utf-8", errors="replace")

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.name, "vocab_size": self.vocab_size}


class BPETokenizer:
    """A byte-level BPE from the `tokenizers` package; train with `train`, or `load` a file."""

    name = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._tok = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB) -> BPETokenizer:
        """Learn merges on `texts` up to `vocab_size` (fewer if the text runs out of pairs)."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet):
            raise UserError(f"BPE vocab_size must be at least {len(alphabet)}, got {vocab_size}")
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"corrupt tokenizer file {path}: not valid JSON ({exc})") from exc
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        # The Rust side raises a plain Exception for any malformed file; nothing narrower exists.
        except Exception as exc:
            raise UserError(f"corrupt tokenizer file {path}: {exc}") from exc
        if not isinstance(tok.model, models.BPE):
            raise UserError(f"tokenizer file {path} holds a {type(tok.model).__name__}, not a BPE")
        return cls(tok)

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), self._tok.to_str().encode("utf-8"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.name, "vocab_size": self.vocab_size}


def build_tokenizer(
    kind: str, texts: Iterable[str] | None = None, vocab_size: int = DEFAULT_BPE_VOCAB
) -> Tokenizer:
    """A new tokenizer of `kind`: "bpe" trains on `texts` (the train split); "byte" needs none."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if texts is None:
            raise ValueError("build_tokenizer('bpe') needs the texts to train on")
        return BPETokenizer.train(texts, vocab_size)
    raise UserError(f"unknown tokenizer {kind!r}: choose one of {', '.join(TOKENIZER_KINDS)}")


def load_tokenizer(config: dict[str, Any], run_dir: str | Path) -> Tokenizer:
    """The tokenizer `config` (from `to_config`) describes; BPE reads run_dir/tokenizer.json."""
    kind = config.get("kind")
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "bpe":
        tok = BPETokenizer.load(Path(run_dir) / TOKENIZER_FILE)
    else:
        raise UserError(
            f"unknown tokenizer {kind!r} in config: choose one of {', '.join(TOKENIZER_KINDS)}"
        )
    expected = config.get("vocab_size", tok.vocab_size)
    if expected != tok.vocab_size:
        raise UserError(
            f"tokenizer in {run_dir} has vocab_size {tok.vocab_size}; the config says {expected}"
        )
    return tok


def save_tokenizer(tok: Tokenizer, run_dir: str | Path) -> Path | None:
    """Write run_dir/tokenizer.json atomically if `tok` has one (BPE); return its path or None."""
    if not isinstance(tok, BPETokenizer):
        return None
    path = Path(run_dir) / TOKENIZER_FILE
    tok.save(path)
    return path
