"""`gateloop grid`: a tiny grid (two mixers, LM and a task) runs end to end, its results have the
documented schema, it resumes without rerunning, its report and plot are made, and bad grid files
get one clear error (exit code 2)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from gateloop.cli import main
from gateloop.errors import UserError
from gateloop.grid import best_lr, load_grid

LM_KEYS = {"grid_cell", "label", "task", "mixer", "mixer_options", "seed", "lr", "parameters", "train_tokens",
           "val_bits_per_byte", "test_bits_per_byte", "test_bits_per_byte_at", "tokens_per_s", "wall_seconds",
           "train_seconds", "curve", "loss_at_position", "sets"}

GRID = """
name = "tiny"
seeds = [0, 1]
threads = 1
set = ["train.steps=4", "train.batch_size=2", "train.eval_every=2", "train.log_every=1",
       "model.d_model=16", "model.n_layers=1", "train.warmup_steps=1"]
contexts = [16, 64]

[tasks.lm]
set = ["data.path={corpus}", "train.seq_len=16", "train.eval_tokens=128"]

[tasks.memory_horizon]
set = ["task.seq_len=16", "task.n_test=8"]

[[cells]]
name = "gateloop"
mixer = "gateloop"
lr = [1e-3, 3e-3]

[[cells]]
name = "transformer"
group = "baselines"
mixer = "transformer"
options = {{head_dim = 8}}
tasks = ["lm"]
seeds = [0]
"""


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """The tiny grid run once with two jobs: (grid file, results folder, runs folder)."""
    root = tmp_path_factory.mktemp("grid")
    path = root / "tiny.toml"
    path.write_text(GRID.format(corpus=corpus))
    results, runs = root / "results" / "tiny", root / "runs"
    args = [str(path), "--results", str(results), "--runs", str(runs), "--no-progress"]
    assert main(["grid", *args, "--jobs", "2"]) == 0
    return path, results, runs, args


def test_every_run_writes_a_result_with_the_schema(finished):
    path, results, _, _ = finished
    lm = sorted((results / "lm").glob("*.json"))
    task = sorted((results / "memory_horizon").glob("*.json"))
    # gateloop: 2 learning rates x 2 seeds on each task; transformer: one seed, LM only.
    assert [p.name for p in lm] == ["gateloop-lr-0.001-seed0.json", "gateloop-lr-0.001-seed1.json",
                                    "gateloop-lr-0.003-seed0.json", "gateloop-lr-0.003-seed1.json",
                                    "transformer-seed0.json"]
    assert len(task) == 4
    result = json.loads(lm[2].read_text())
    assert LM_KEYS <= result.keys()
    assert (result["mixer"], result["lr"], result["seed"], result["grid_cell"]) == ("gateloop", 0.003, 0, "gateloop")
    assert set(result["test_bits_per_byte_at"]) == {"16", "64"}
    assert result["test_bits_per_byte"] == result["test_bits_per_byte_at"]["16"]  # the training length
    assert result["train_tokens"] == 4 * 2 * 16
    assert [p["step"] for p in result["curve"] if "val_bpb" in p] == [2, 4]
    assert result["curve"][-1]["val_bpb"] == result["val_bits_per_byte"]
    assert all(p["seconds"] >= 0 and p["tokens"] == p["step"] * 32 for p in result["curve"])
    positions = result["loss_at_position"]["64"]
    assert positions[0][0] == 1 and positions[-1][0] <= 64 and len(positions) <= 64
    transformer = json.loads(lm[-1].read_text())
    assert transformer["mixer_options"] == {"head_dim": 8} and transformer["parameters"] != result["parameters"]
    mh = json.loads(task[0].read_text())
    assert mh["task"] == "memory_horizon" and 0 <= mh["test_accuracy"] <= 1 and "test_accuracy_4x" in mh
    # Nothing but results in the results folder: the weights stay in the runs folder.
    assert not list(results.rglob("*.safetensors"))


def test_a_finished_grid_is_skipped_and_a_stale_result_reruns(finished, capsys):
    path, results, _, args = finished
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*.json")}
    assert main(["grid", *args]) == 0
    assert "9 of 9 runs done; 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*.json")} == before
    # --set changes every run's overrides: nothing is done for that grid, and --seeds 1 keeps seed 0 only.
    grid = load_grid(path, ["train.grad_clip=0.5"], n_seeds=1)
    assert len(grid.runs) == 5 and all(r.seed == 0 and r.sets[-3] == "train.grad_clip=0.5" for r in grid.runs)


def test_report_tables_are_means_over_seeds(finished, capsys):
    path, results, _, args = finished
    assert main(["grid", *args, "--report"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(p.read_text()) for p in (results / "lm").glob("gateloop-lr-0.003-*.json")]
    values = [r["test_bits_per_byte"] for r in rows]
    expected = (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} "
                f"({min(values):.3f}–{max(values):.3f})")
    line = next(line for line in out.splitlines() if "| gateloop lr=0.003 |" in line)
    assert f"| 2 | {expected} |" in line
    assert "### memory_horizon" in out and "test at context 64" in out
    assert "### Language model: baselines" in out  # a cell's group gets its own table
    assert "| gateloop | lr=" in out  # the sweep's choice


def test_plot_is_written(finished, tmp_path):
    _, _, _, args = finished
    png = tmp_path / "grid.png"
    assert main(["grid", *args, "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_killed_lm_run_resumes_from_its_checkpoint(finished, capsys):
    path, results, runs, args = finished
    victim = results / "lm" / "transformer-seed0.json"
    old = json.loads(victim.read_text())
    victim.unlink()  # as if killed after training, before the result was written
    assert main(["grid", *args]) == 0
    new = json.loads(victim.read_text())
    assert new["test_bits_per_byte"] == old["test_bits_per_byte"]  # resumed at its last step: the same model
    log = (runs / "tiny" / "lm" / "transformer-seed0.log").read_text()
    assert "--resume" in log


def test_lr_from_takes_each_cells_best_learning_rate(finished, tmp_path, capsys):
    path, results, _, _ = finished
    board = tmp_path / "board.toml"
    board.write_text(path.read_text().replace("lr = [1e-3, 3e-3]", "").replace('name = "tiny"', 'name = "board"\n'
                     f'lr_from = "{path}"') + '[[cells]]\nname = "hgrn"\nmixer = "hgrn"\n')
    grid = load_grid(board, results_root=results.parent)
    val = {lr: statistics.mean(json.loads(p.read_text())["val_bits_per_byte"]
                               for p in (results / "lm").glob(f"gateloop-lr-{lr}-*.json")) for lr in (0.001, 0.003)}
    best = min(val, key=val.get)
    assert best_lr(load_grid(path), results, "gateloop") == best
    assert {r.cell for r in grid.runs} == {"gateloop", "transformer"}  # hgrn was not swept: left out
    assert all(f"train.lr={best!r}" in r.sets for r in grid.runs if r.cell == "gateloop")
    assert all("train.lr=0.003" in r.sets for r in grid.runs if r.cell == "transformer")
    assert "cell 'hgrn' left out" in capsys.readouterr().err
    # A sweep that has not finished for a cell gives that cell no learning rate yet.
    (results / "lm" / "gateloop-lr-0.001-seed1.json").rename(tmp_path / "aside.json")
    try:
        assert best_lr(load_grid(path), results, "gateloop") is None
    finally:
        (tmp_path / "aside.json").rename(results / "lm" / "gateloop-lr-0.001-seed1.json")


@pytest.mark.parametrize("text, message", [
    ("", "needs at least one [[cells]]"),
    ("cells = 3", "needs at least one [[cells]]"),
    ("bogus = 1\n[[cells]]\nname = 'a'", "unknown key(s) bogus"),
    ("[[cells]]\nmixer = 'gateloop'", "cell 1 needs a name"),
    ("[[cells]]\nname = 'a'\n[[cells]]\nname = 'a'", "two cells are named 'a'"),
    ("[[cells]]\nname = 'a'\nlr = -1", "lr must be a positive number"),
    ("[[cells]]\nname = 'a'\nmixer = 'nope'", "unknown mixer 'nope'"),
    ("[[cells]]\nname = 'a'\nset = ['train.stepz=3']", "unknown config key 'train.stepz'"),
    ("[tasks.sudoku]\n[[cells]]\nname = 'a'", "unknown task 'sudoku'"),
    ("seeds = [-1]\n[[cells]]\nname = 'a'", "seeds must be a non-empty list"),
    ("[[cells]]\nname = 'a'\ntasks = ['mqar']", "tasks must be a list of the grid's tasks"),
    ("lr_from = 'nowhere.toml'\n[[cells]]\nname = 'a'", "lr_from: no grid file 'nowhere.toml'"),
    ("[[cells", "not valid TOML"),
])
def test_bad_grid_files_get_one_clear_error(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_grid(path)
    assert main(["grid", str(path), "--results", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_missing_grid_file(tmp_path, capsys):
    assert main(["grid", str(tmp_path / "none.toml")]) == 2
    assert "cannot read grid file" in capsys.readouterr().err


def test_sigterm_stops_the_grid_and_the_next_call_resumes(corpus, tmp_path):
    """SIGTERM reaches the running trainer (it saves a checkpoint), queued runs do not start, and the
    same command then resumes the run from that checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "long.toml"
    path.write_text(GRID.format(corpus=corpus).replace('"train.steps=4"', '"train.steps=3000"')
                    .replace('"train.eval_every=2"', '"train.eval_every=1000", "train.checkpoint_every=5"')
                    .replace("[tasks.memory_horizon]\nset = [\"task.seq_len=16\", \"task.n_test=8\"]\n", ""))
    results, runs = tmp_path / "results", tmp_path / "runs"
    cmd = [sys.executable, "-m", "gateloop", "grid", str(path), "--results", str(results), "--runs", str(runs),
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = runs / "tiny" / "lm" / "gateloop-lr-0.001-seed0" / "trainer_state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state.exists(), "the first run never saved a checkpoint"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped" in err
    assert not results.exists() or not list(results.rglob("*.json"))
    assert sorted(p.name for p in (runs / "tiny" / "lm").iterdir() if p.is_dir()) == ["gateloop-lr-0.001-seed0"]
    log = (runs / "tiny" / "lm" / "gateloop-lr-0.001-seed0.log").read_text()
    assert "SIGTERM" in log  # the trainer's own message: checkpoint saved
    # The next call resumes it (a shorter budget keeps the test quick: train.* may change on resume).
    grid = load_grid(path, n_seeds=1)
    from gateloop.grid import run_commands

    first = grid.runs[0]
    assert "--resume" in run_commands(first, first.run_dir(runs / "tiny"))[0]


def test_a_result_made_under_other_mixer_defaults_is_stale(finished):
    from gateloop.grid import is_done

    path, results, _, _ = finished
    run = next(r for r in load_grid(path).runs if r.cell == "transformer")
    assert is_done(run, results)
    result_path = run.result_path(results)
    original = result_path.read_text()
    result = json.loads(original)
    assert result["mixer_defaults"]["rope_base"] == 10000.0
    try:
        result["mixer_defaults"]["rope_base"] = 500.0  # as if the default had changed since the run
        result_path.write_text(json.dumps(result))
        assert not is_done(run, results)
    finally:
        result_path.write_text(original)


GRIDS = sorted((Path(__file__).parents[1] / "configs" / "grids").glob("*.toml"))


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_every_shipped_grid_file_loads(path):
    """Each grid in configs/grids/ parses, and every run's overrides make a valid config."""
    grid = load_grid(path, results_root=path.parents[2] / "results")
    assert grid.name == path.stem and grid.runs


def test_a_result_recorded_before_short_conv_existed_stays_current(tmp_path):
    """Its mixer_defaults lack the key: the run had no conv, which is what the default 0 means."""
    from gateloop.grid import is_done, mixer_defaults

    path = tmp_path / "g.toml"
    path.write_text('name = "g"\nseeds = [0]\n[tasks.mqar]\n[[cells]]\nname = "hgrn"\nmixer = "hgrn"\n')
    run = load_grid(path).runs[0]
    results = tmp_path / "results"
    defaults = mixer_defaults("hgrn")
    assert defaults["short_conv"] == 0

    def record(recorded_defaults):
        result = run.result_path(results)
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps({"mixer": "hgrn", "sets": list(run.sets), "mixer_defaults": recorded_defaults}))

    record({k: v for k, v in defaults.items() if k != "short_conv"})
    assert is_done(run, results)
    record({**defaults, "short_conv": 4})  # made when the default was another width: stale
    assert not is_done(run, results)


def test_an_acp_run_keeps_its_pruned_fraction_and_the_report_shows_it(corpus, tmp_path, capsys):
    """FoX with pruning (as configs/grids/claims_acp.toml): the result holds the mean pruned fraction
    and the per-step curve; the report adds an "attention pruned" column, 0 for the run without."""
    path = tmp_path / "acp.toml"
    path.write_text(f"""
name = "acp"
seeds = [0]
threads = 1
set = ["model.mixer=fox", "model.d_model=16", "model.n_layers=1", "model.mixer_options.head_dim=8",
       "model.mixer_options.block_size=8", "train.steps=3", "train.batch_size=2", "train.log_every=1",
       "train.eval_every=3", "train.warmup_steps=1", "train.seq_len=64", "train.eval_tokens=128",
       "data.path={corpus}"]
[tasks.lm]
[[cells]]
name = "fox"
[[cells]]
name = "fox with ACP"
options = {{log_pruning_tolerance = -10}}
""")
    args = [str(path), "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), "--no-progress"]
    assert main(["grid", *args]) == 0
    exact, pruned = (json.loads((tmp_path / "results" / "lm" / f"{name}-seed0.json").read_text())
                     for name in ("fox", "fox-with-acp"))
    assert "acp_pruned_fraction" not in exact
    steps = [p["acp_pruned_fraction"] for p in pruned["curve"] if "acp_pruned_fraction" in p]
    assert len(steps) == 3 and pruned["acp_pruned_fraction"] == pytest.approx(statistics.fmean(steps))
    capsys.readouterr()
    assert main(["grid", *args, "--report"]) == 0
    table = capsys.readouterr().out
    assert "attention pruned" in table and f"{pruned['acp_pruned_fraction']:.3f}" in table and "| 0.000 |" in table
