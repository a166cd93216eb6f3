"""The local lm-evaluation-harness tasks: their datasets (read by the YAML files beside this one) and
the command that builds them from a corpus's test split.

    python -m gateloop.hf.tasks.data --corpus shakespeare     # rewrites lastword.jsonl, passages.jsonl here

lastword: a passage cut before the last word of one of its lines; the task scores that word (" word")
after it (a LAMBADA-like probe). passages: whole stretches of text, scored token by token (perplexity).
Both come from the test split of gateloop's deterministic document split (data.val_fraction and
data.test_fraction at their defaults), so no model trained by gateloop on that corpus saw them.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
LASTWORD, PASSAGES = HERE / "lastword.jsonl", HERE / "passages.jsonl"
# A line that ends in a word of letters (no punctuation after it), the word at least 3 letters long.
LINE_ENDING_IN_A_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})$")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dataset(path: Path):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_jsonl(path))})


def lastword(**kwargs):
    """custom_dataset of gateloop_lastword.yaml (lm-eval passes the task's metadata; none is needed)."""
    return _dataset(LASTWORD)


def passages(**kwargs):
    """custom_dataset of gateloop_passages.yaml."""
    return _dataset(PASSAGES)


def build(texts: list[str], n_lastword: int, n_passages: int, context_chars: int, passage_chars: int):
    """(lastword rows, passage rows) spread evenly over the texts (the test split's documents)."""
    text = "\n\n".join(texts)
    lines, pos = [], 0
    for line in text.split("\n"):
        m = LINE_ENDING_IN_A_WORD.match(line)
        if m and pos >= context_chars:
            lines.append((pos, m))
        pos += len(line) + 1
    rows = []
    for i in range(n_lastword):
        pos, m = lines[i * len(lines) // n_lastword]
        context = text[pos - context_chars:pos] + m.group(1)
        rows.append({"context": context[context.find("\n") + 1:].lstrip(), "target": m.group(2)})  # from a line start
    step = len(text) // n_passages
    pieces = []
    for i in range(n_passages):
        start = text.find("\n", i * step) + 1  # whole lines
        end = text.rfind("\n", start, start + passage_chars)
        pieces.append({"text": text[start:end].strip()})
    return rows, pieces


def main(argv: list[str] | None = None) -> None:
    from ...config import DataConfig
    from ...data import document_texts, load_corpus, split_documents

    p = argparse.ArgumentParser(prog="python -m gateloop.hf.tasks.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--lastword", type=int, default=200, help="lastword examples")
    p.add_argument("--passages", type=int, default=20, help="perplexity passages")
    p.add_argument("--context-chars", type=int, default=300)
    p.add_argument("--passage-chars", type=int, default=1000)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    split = DataConfig()  # the default fractions, as `gateloop train` splits
    test = document_texts(split_documents(load_corpus(args.corpus, None), val_fraction=split.val_fraction,
                                          test_fraction=split.test_fraction)["test"])
    rows, pieces = build(test, args.lastword, args.passages, args.context_chars, args.passage_chars)
    for name, items in (("lastword.jsonl", rows), ("passages.jsonl", pieces)):
        (args.out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items),
                                     encoding="utf-8")
        print(f"{args.out / name}: {len(items)} rows from the {args.corpus} test split ({len(test)} documents)")


if __name__ == "__main__":
    main()
