"""Synthetic tasks: the generators against plain loops, the task config, and a tiny run of each task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gateloop.cli import main
from gateloop.data import synthetic
from gateloop.errors import UserError
from gateloop.tasks import (batch_index, evaluate_accuracy, load_task_config, load_task_run, make_task_data,
                            train_task)

TINY = ["model.d_model=16", "model.n_layers=1", "train.steps=4", "train.batch_size=4", "train.eval_every=2",
        "train.log_every=1", "train.warmup_steps=1", "task.n_test=8", "train.threads=1"]
TINY_TASK = {"memory_horizon": ["task.seq_len=16"], "mqar": ["task.seq_len=32", "task.n_pairs=4"],
             "selective_copy": ["task.seq_len=16", "task.n_data=4"]}


def test_memory_horizon_matches_a_loop():
    inputs, targets = synthetic.memory_horizon(50, 40, n_numbers=7, max_resets=5, seed=3)
    assert inputs.shape == targets.shape == (50, 40) and inputs.dtype == targets.dtype == torch.int64
    for x, y in zip(inputs.tolist(), targets.tolist()):
        assert 1 <= x.count(7) <= 5
        total = 0
        for token, target in zip(x, y):
            total = 0 if token == 7 else (total + token) % 7
            assert target == total


def test_mqar_targets_are_the_values_of_the_queried_keys():
    inputs, targets = synthetic.mqar(30, 48, n_keys=10, n_values=6, n_pairs=6, seed=1)
    assert int(inputs.max()) < synthetic.vocab_size("mqar", n_keys=10, n_values=6)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        keys, values = x[0:12:2], x[1:12:2]
        assert len(set(keys)) == 6 and all(1 <= k <= 10 for k in keys) and all(11 <= v <= 16 for v in values)
        table = dict(zip(keys, values))
        queries = [(t, x[t]) for t in range(12, 48) if y[t] != synthetic.IGNORE]
        assert sorted(k for _, k in queries) == sorted(keys)  # every key queried once
        for t, key in queries:
            assert y[t] == table[key] and x[t + 1] == table[key]
        assert all(target == synthetic.IGNORE for target in y[:12])


def test_selective_copy_targets_are_the_data_in_order():
    inputs, targets = synthetic.selective_copy(30, 20, n_data=5, n_tokens=4, seed=2)
    for x, y in zip(inputs.tolist(), targets.tolist()):
        data = [token for token in x[:15] if token >= 2]
        assert len(data) == 5 and x[15:] == [1] * 5 and y[15:] == data and y[:15] == [synthetic.IGNORE] * 15
    assert int(inputs.max()) < synthetic.vocab_size("selective_copy", n_tokens=4)


@pytest.mark.parametrize("name", list(synthetic.TASKS))
def test_generators_are_pure_functions_of_the_seed(name):
    a, b, c = (synthetic.TASKS[name](8, seed=s) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape[1] == synthetic.task_defaults(name)["seq_len"]


def test_drop_overlap_removes_test_sequences_seen_in_training():
    train = synthetic.mqar(40, 8, n_keys=2, n_values=2, n_pairs=2, seed=0)  # a tiny space: overlaps certain
    test = synthetic.mqar(20, 8, n_keys=2, n_values=2, n_pairs=2, seed=1)
    x, y, dropped = synthetic.drop_overlap(train[0], *test)
    assert dropped > 0 and len(x) == len(y) == 20 - dropped
    seen = {tuple(row) for row in train[0].tolist()}
    assert not any(tuple(row) in seen for row in x.tolist())


def test_bad_generator_parameters_raise():
    with pytest.raises(ValueError, match="n_keys >= n_pairs"):
        synthetic.mqar(1, 64, n_keys=4, n_pairs=8)
    with pytest.raises(ValueError, match="seq_len >= 2"):
        synthetic.selective_copy(1, 10, n_data=8)


def test_batches_cover_the_training_set_each_pass():
    rows = torch.cat([batch_index(step, 4, 10, seed=0) for step in range(5)])  # two passes of 10
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:].tolist()) == list(range(10))
    assert torch.equal(rows, torch.cat([batch_index(step, 4, 10, seed=0) for step in range(5)]))


def test_task_config_sets_the_vocabulary_and_keeps_model_and_train_keys():
    cfg = load_task_config(None, ["task.name=mqar", "task.n_keys=20", "task.n_values=10", "task.n_pairs=4",
                                  "model.mixer=hgrn", "model.mixer_options.use_complex=false", "train.lr=1"])
    assert cfg.model.vocab_size == 31 and cfg.model.mixer == "hgrn" and cfg.train.lr == 1.0
    assert cfg.task.params() == {"n_keys": 20, "n_values": 10, "n_pairs": 4}


def test_each_task_has_one_default_learning_rate_for_every_mixer():
    """MQAR's budget (configs/tasks/mqar.toml) is the plain `gateloop task run mqar`; a set rate wins."""
    for mixer in ("gateloop", "transformer"):
        assert load_task_config(None, ["task.name=mqar", f"model.mixer={mixer}"]).train.lr == 1e-3
        assert load_task_config(None, [f"model.mixer={mixer}"]).train.lr == 3e-3  # memory_horizon
    budget = Path(__file__).resolve().parent.parent / "configs" / "tasks" / "mqar.toml"
    assert load_task_config(budget).train == load_task_config(None, ["task.name=mqar"]).train
    assert load_task_config(None, ["task.name=mqar", "train.lr=3e-3"]).train.lr == 3e-3


def test_task_config_from_toml(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[task]\nname = "selective_copy"\nn_data = 3\n[model]\nd_model = 32\n'
                    '[model.mixer_options]\nhead_dim = 8\n[train]\nsteps = 9\n')
    cfg = load_task_config(path, ["train.steps=10"])
    assert (cfg.task.name, cfg.task.n_data, cfg.model.d_model, cfg.train.steps) == ("selective_copy", 3, 32, 10)
    assert cfg.model.mixer_options == {"head_dim": 8}


@pytest.mark.parametrize("override,needle", [
    ("task.nope=1", "task.nope"), ("task.seq_len=abc", "task.seq_len expects an integer"),
    ("task.name=nope", "unknown task 'nope'"), ("task.n_pairs=4", "task.n_pairs is not a parameter of memory_horizon"),
    ("task.seq_len=0", "task.seq_len must be positive"), ("train.seq_len=8", "train.seq_len"),
    ("data.corpus=sotu", "data.corpus"), ("train.steps=0", "train.steps must be positive"),
    ("model.mixer=nope", "unknown mixer 'nope'"), ("task.n_test=0", "task.n_test"), ("task", "key=value"),
])
def test_bad_task_keys_are_user_errors_naming_the_key(override, needle):
    with pytest.raises(UserError, match=needle):
        load_task_config(None, [override])


def test_generator_checks_become_user_errors():
    with pytest.raises(UserError, match="n_keys >= n_pairs"):
        load_task_config(None, ["task.name=mqar", "task.n_keys=4", "task.n_pairs=8"])


def rescored(run_dir):
    """The saved model's accuracies, recomputed from its weights on the run's own test sets."""
    model, cfg = load_task_run(run_dir)
    data = make_task_data(cfg)
    score = lambda split: evaluate_accuracy(model, *split, batch_size=cfg.train.batch_size, device="cpu")  # noqa: E731
    return score(data.test), (score(data.test_long) if data.test_long is not None else None)


@pytest.mark.parametrize("name", list(synthetic.TASKS))
def test_tiny_run_of_each_task(name, tmp_path):
    out = tmp_path / "run"
    cfg = load_task_config(None, [f"task.name={name}", *TINY, *TINY_TASK[name]])
    metrics = train_task(cfg, out, progress=False)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics and metrics["steps"] == 4
    assert rescored(out) == (metrics["test_accuracy"], metrics.get("test_accuracy_4x"))
    assert ("test_accuracy_4x" in metrics) == (name == "memory_horizon")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "test_accuracy" in r] == [2, 4]
    assert (out / "learning_curve.png").stat().st_size > 0 and (out / "model.safetensors").exists()


def test_tiny_run_of_every_ablation(tmp_path):
    for i, opts in enumerate([["transition=fixed"], ["transition=none", "use_complex=false"],
                              ["use_complex=false", "head_dim=4"]]):
        cfg = load_task_config(None, [*TINY, *TINY_TASK["memory_horizon"], "train.steps=2",
                                      *(f"model.mixer_options.{o}" for o in opts)])
        metrics = train_task(cfg, tmp_path / str(i), progress=False)
        assert rescored(tmp_path / str(i)) == (metrics["test_accuracy"], metrics["test_accuracy_4x"])


def test_cli_task_run_and_its_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    sets = [arg for item in [*TINY, *TINY_TASK["mqar"]] for arg in ("--set", item)]
    assert main(["task", "run", "mqar", "--out", str(out), "--no-progress", *sets]) == 0
    assert json.loads((out / "metrics.json").read_text())["task"] == "mqar"
    capsys.readouterr()
    assert main(["task", "run", "mqar", "--out", str(out), "--no-progress", *sets]) == 2  # never overwritten
    assert main(["task", "run", "nope", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert main(["task", "run", "mqar", "--set", "task.n_numbers=3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("gateloop: error: ") for line in err)
    assert "already exists" in err[0] and "unknown task 'nope'" in err[1] and "task.n_numbers" in err[2]


def test_a_task_run_restores_the_thread_count(tmp_path):
    import torch

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    cfg = load_task_config(None, ["task.name=memory_horizon", *TINY_TASK["memory_horizon"],
                                  *[t for t in TINY if not t.startswith("train.threads")], f"train.threads={wanted}"])
    train_task(cfg, tmp_path / "run", progress=False)
    assert torch.get_num_threads() == before
