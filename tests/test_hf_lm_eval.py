"""lm-evaluation-harness on exported gateloop models: its log-likelihoods are the project's own
log-probabilities, and `python -m gateloop.hf.lm_eval` runs the shipped local tasks offline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

import gateloop.hf  # noqa: F401  (registers the auto classes)
from gateloop.checkpoint import load_run
from gateloop.data import ByteTokenizer
from gateloop.hf.export import export_run
from gateloop.hf.lm_eval import TASKS, lm_eval_argv, main
from gateloop.hf.tasks.data import LASTWORD, PASSAGES, build, read_jsonl
from hf_runs import make_run

PREFIX = 255  # the exported byte tokenizer's prefix token (byte 0xFF)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """mixer -> (the project's model, its export), made on first use."""
    made = {}

    def get(mixer):
        if mixer not in made:
            root = tmp_path_factory.mktemp(f"lm-eval-{mixer}")
            run = make_run(root / "run", mixer)
            made[mixer] = load_run(run)[0], export_run(run, root / "hf")
        return made[mixer]
    return get


def log_prob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The project's own log P(continuation | context) and whether greedy decoding gives it."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    scores = torch.log_softmax(logits[0, len(context) - 1:].double(), -1)
    target = torch.tensor(continuation)
    return scores.gather(1, target[:, None]).sum().item(), bool((scores.argmax(-1) == target).all())


@pytest.mark.parametrize("mixer", ["gateloop", "transformer"])
def test_loglikelihoods_are_the_projects_log_probs(mixer, exported):
    own, out = exported(mixer)
    lm = HFLM(pretrained=str(out), device="cpu", batch_size=2)
    assert lm.prefix_token_id == PREFIX
    enc = ByteTokenizer().encode
    pairs = [("the cat sat on", " the mat"), ("ROMEO:\nWhat", " light"), ("a", "b c d e f g"), ("", "empty context")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        expected, expected_greedy = log_prob(own, enc(context) or [PREFIX], enc(continuation))
        assert ll == pytest.approx(expected, rel=1e-4, abs=1e-4) and greedy == expected_greedy, (context, continuation)
    texts = ["Now is the winter of our discontent", "x"]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    for text, ll in zip(texts, rolling):
        assert ll == pytest.approx(log_prob(own, [PREFIX], enc(text))[0], rel=1e-4, abs=1e-4)


def test_the_cli_runs_the_local_tasks_offline(exported, tmp_path, monkeypatch):
    """One run (lm-eval indexes its own task library first, about 15 s of CPU)."""
    own, out = exported("gateloop")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    main(["--model", "hf", "--model_args", f"pretrained={out}", "--tasks", "gateloop_lastword,gateloop_passages",
          "--limit", "3", "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path)])
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"]
    enc = ByteTokenizer().encode
    scored = [log_prob(own, enc(doc["context"]), enc(" " + doc["target"])) for doc in read_jsonl(LASTWORD)[:3]]
    lastword = results["gateloop_lastword"]
    assert lastword["acc,none"] == pytest.approx(sum(g for _, g in scored) / 3)
    assert lastword["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in scored) / 3), rel=1e-3)
    docs = read_jsonl(PASSAGES)[:3]
    total = sum(log_prob(own, [PREFIX], enc(doc["text"]))[0] for doc in docs)
    n_bytes = sum(len(doc["text"].encode()) for doc in docs)
    assert results["gateloop_passages"]["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-4)


def test_the_argv_gains_the_task_folder():
    assert lm_eval_argv(["--model", "hf"]) == ["run", "--model", "hf", "--include_path", str(TASKS)]
    assert lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks", "--include_path", str(TASKS)]
    assert lm_eval_argv(["run", "--include_path", "x"]) == ["run", "--include_path", "x"]
    assert lm_eval_argv(["--help"]) == ["--help"]
    assert {p.name for p in TASKS.iterdir()} >= {"gateloop_lastword.yaml", "gateloop_passages.yaml",
                                                  "lastword.jsonl", "passages.jsonl", "data.py"}


def test_the_task_builder_cuts_real_text_before_a_lines_last_word(corpus):
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    rows, passages = build(texts, n_lastword=10, n_passages=3, context_chars=100, passage_chars=200)
    joined = "\n\n".join(texts)
    longest_line = max(len(line) for line in joined.split("\n"))
    for row in rows:
        at = joined.find(row["context"] + " " + row["target"] + "\n")
        assert at >= 0 and row["target"].isalpha() and len(row["context"]) <= 100 + longest_line, row
    assert len(rows) == 10 and len({r["context"] for r in rows}) == 10
    assert all(p["text"] in joined and 0 < len(p["text"]) <= 200 for p in passages)
    assert len(read_jsonl(LASTWORD)) == 200 and len(read_jsonl(PASSAGES)) == 20  # the shipped files
