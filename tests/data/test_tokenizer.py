"""Tokenizers: exact round trips, save/load through a run directory, clear errors on bad files."""

import json

import pytest

from gateloop.data import (
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
)
from gateloop.errors import UserError

SAMPLES = ["", "hello world", "  two  spaces\n\ttab\r\n", "héllo wörld, 日本語 🙂", "O!\n"]

TRAIN_TEXTS = [
    "To be, or not to be, that is the question:\n" * 20,
    "Whether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune\n" * 20,
    "Fellow-Citizens of the Senate and House of Representatives: the state of the union\n" * 20,
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TRAIN_TEXTS, vocab_size=400)


def test_byte_round_trip_and_ids():
    tok = ByteTokenizer()
    assert tok.name == "byte" and tok.vocab_size == 256
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(["a", "b"]) == [[97], [98]]


def test_byte_decode_replaces_invalid_utf8():
    # A model can emit a lone continuation byte; decoding must not raise.
    assert ByteTokenizer().decode([104, 0x80, 105]) == "h\ufffdi"


def test_bpe_round_trip(bpe):
    assert bpe.name == "bpe"
    assert 256 < bpe.vocab_size <= 400
    for text in SAMPLES + TRAIN_TEXTS:
        assert bpe.decode(bpe.encode(text)) == text
    # Merges were learnt: frequent text takes fewer tokens than bytes.
    assert len(bpe.encode(TRAIN_TEXTS[0])) < len(TRAIN_TEXTS[0].encode()) / 2


def test_bpe_save_load_through_run_dir(bpe, tmp_path):
    config = bpe.to_config()
    assert json.loads(json.dumps(config)) == {"kind": "bpe", "vocab_size": bpe.vocab_size}
    path = save_tokenizer(bpe, tmp_path)
    assert path == tmp_path / "tokenizer.json" and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = load_tokenizer(config, tmp_path)
    assert isinstance(loaded, BPETokenizer)
    for text in SAMPLES + TRAIN_TEXTS:
        assert loaded.encode(text) == bpe.encode(text)


def test_byte_needs_no_file(tmp_path):
    tok = build_tokenizer("byte")
    assert save_tokenizer(tok, tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    assert isinstance(load_tokenizer(tok.to_config(), tmp_path), ByteTokenizer)


def test_build_tokenizer_bpe_and_unknown():
    tok = build_tokenizer("bpe", TRAIN_TEXTS, vocab_size=280)
    assert tok.name == "bpe" and tok.vocab_size <= 280
    with pytest.raises(UserError, match="unknown tokenizer 'wordpiece'"):
        build_tokenizer("wordpiece")
    with pytest.raises(UserError, match="at least 256"):
        build_tokenizer("bpe", TRAIN_TEXTS, vocab_size=100)


@pytest.mark.parametrize(
    "content",
    [b"{ not json", b"\xff\xfe\x00binary", b'{"version": "1.0", "model": 42}', b"[]"],
    ids=["truncated", "binary", "wrong-model", "json-list"],
)
def test_corrupt_tokenizer_file(tmp_path, content):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(UserError, match="tokenizer"):
        load_tokenizer({"kind": "bpe", "vocab_size": 400}, tmp_path)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(UserError, match="tokenizer file not found"):
        load_tokenizer({"kind": "bpe"}, tmp_path)


def test_config_errors(bpe, tmp_path):
    save_tokenizer(bpe, tmp_path)
    with pytest.raises(UserError, match="vocab_size"):
        load_tokenizer({"kind": "bpe", "vocab_size": bpe.vocab_size + 1}, tmp_path)
    with pytest.raises(UserError, match="unknown tokenizer"):
        load_tokenizer({"kind": "sentencepiece"}, tmp_path)
    with pytest.raises(UserError, match="unknown tokenizer None"):
        load_tokenizer({}, tmp_path)
