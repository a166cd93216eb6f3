"""Experiment grids: `gateloop grid FILE.toml` trains every cell of a grid with every seed, one
process per run, and keeps one small result file per finished run (docs/grids.md has the format).

    gateloop grid configs/grids/lm_board.toml --jobs 2        # run (resumable), results/lm_board/
    gateloop grid configs/grids/lm_board.toml --report        # markdown tables from results/
    gateloop grid configs/grids/lm_board.toml --plot board.png

A run is a (task, cell, seed). Language-model runs ("lm") are `gateloop train` followed by
`gateloop eval --split test --context ...`; synthetic-task runs are `gateloop task run`. Weights
stay in the run directories (runs/grid/<name>/, not committed); the result files (metrics and the
learning curve, a few kB) go to results/<name>/<task>/<cell>-seed<N>.json and are committed, so a
grid resumes on any machine where it stopped, and its tables are remade from the repository.
A run whose result file exists with the same overrides is skipped; one that was killed resumes from
its last checkpoint (LM runs) or starts again (task runs).
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .errors import UserError
from .fileio import atomic_write_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LM = "lm"
GRID_KEYS = {"name", "description", "seeds", "threads", "set", "lr", "lr_from", "contexts", "tasks", "cells"}
CELL_KEYS = {"name", "group", "mixer", "options", "lr", "set", "seeds", "tasks", "vary"}
TASK_KEYS = {"config", "set"}
ACP = "acp_pruned_fraction"  # logged by a FoX run with pruning on (train.py); kept in its curve and mean
POSITION_BINS = 48  # the loss-per-position curve kept in a result: means over log-spaced bins


@dataclass(frozen=True)
class Run:
    """One training run of a grid: a cell (with its swept values) on one task with one seed."""

    task: str  # "lm" or a synthetic task (memory_horizon, mqar, selective_copy)
    cell: str  # the cell's name in the grid file
    label: str  # the cell's name and its swept values: "gateloop lr=0.003"
    group: str  # the report's table this run goes in ("" for the main one)
    seed: int
    sets: tuple[str, ...]  # every override, in the order applied
    config: str | None  # a task run's --config file
    contexts: tuple[int, ...]  # LM runs: the test split is scored with each context length
    threads: int

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in ".-" else "-" for c in self.label.lower()).strip("-")

    def result_path(self, results: Path) -> Path:
        return results / self.task / f"{self.slug}-seed{self.seed}.json"

    def run_dir(self, runs: Path) -> Path:
        return runs / self.task / f"{self.slug}-seed{self.seed}"


@dataclass
class Grid:
    name: str
    path: Path
    runs: list[Run]
    raw: dict[str, Any]


def _fail(path: Path, what: str):
    raise UserError(f"grid file {path}: {what}")


def _strings(path: Path, where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        _fail(path, f"{where} must be a list of \"key=value\" strings, got {value!r}")
    return value


def _literal(value: Any) -> str:
    """A value as --set reads it back: TOML literal syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _expand_cell(path: Path, cell: dict, lr, grid_seeds: list, tasks: list[str]) -> list[tuple]:
    """One cell's (cell name, label, group, seeds, overrides, tasks), one per combination of its swept
    values: `lr` (a number, or a list to sweep) and `vary` (key -> list of values)."""
    where = f"cell {cell['name']!r}"
    if unknown := set(cell) - CELL_KEYS:
        _fail(path, f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a cell has {', '.join(sorted(CELL_KEYS))}")
    seeds = cell.get("seeds", grid_seeds)
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        _fail(path, f"{where}: seeds must be a non-empty list of non-negative integers, got {seeds!r}")
    cell_tasks = cell.get("tasks", tasks)
    if not isinstance(cell_tasks, list) or set(cell_tasks) - set(tasks):
        _fail(path, f"{where}: tasks must be a list of the grid's tasks ({', '.join(tasks)})")
    options, vary = cell.get("options", {}), cell.get("vary", {})
    if not isinstance(options, dict):
        _fail(path, f"{where}: options must be a table of the mixer's options")
    if not isinstance(vary, dict) or not all(isinstance(v, list) and v for v in vary.values()):
        _fail(path, f"{where}: vary must be a table of key = [values]")
    sets = [f"model.mixer={cell['mixer']}"] if "mixer" in cell else []
    sets += [f"model.mixer_options.{k}={_literal(v)}" for k, v in options.items()]
    sets += _strings(path, f"{where}: set", cell.get("set", []))
    if lr is not None:
        lrs = lr if isinstance(lr, list) else [lr]
        if not lrs or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in lrs):
            _fail(path, f"{where}: lr must be a positive number or a list of them, got {lr!r}")
        if isinstance(lr, list):
            vary = {"train.lr": lrs, **vary}
        else:
            sets.append(f"train.lr={_literal(float(lr))}")
    out = []
    for combo in itertools.product(*vary.values()):
        swept = [f"{k}={_literal(v)}" for k, v in zip(vary, combo)]
        label = " ".join([cell["name"], *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(vary, combo))])
        out.append((cell["name"], label, str(cell.get("group", "")), seeds, sets + swept, cell_tasks))
    return out


def load_grid(path: str | Path, overrides: list[str] = (), n_seeds: int | None = None,
              results_root: Path = Path("results")) -> Grid:
    """Read and check a grid file; every run it describes, in order: seed by seed, cell by cell, task by
    task (so a half-finished grid has every cell at its first seeds). `overrides` (--set) apply to
    every run, last; n_seeds keeps each cell's first n seeds. With `lr_from = "<sweep grid file>"`, a
    cell without its own lr takes the one with the lowest mean validation bits/byte among that grid's
    results under results_root (a cell whose sweep has not finished is left out, with a note)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read grid file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"grid file {path} is not valid TOML: {e}") from None
    if unknown := set(raw) - GRID_KEYS:
        _fail(path, f"unknown key(s) {', '.join(sorted(unknown))}; a grid has {', '.join(sorted(GRID_KEYS))}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        _fail(path, f"name must be a non-empty string without '/', got {name!r}")
    tasks = raw.get("tasks", {LM: {}})
    if not isinstance(tasks, dict) or not tasks:
        _fail(path, "tasks must be a table of tables, e.g. [tasks.lm] or [tasks.memory_horizon]")
    from .data.synthetic import TASKS

    for task, spec in tasks.items():
        if task != LM and task not in TASKS:
            _fail(path, f"unknown task {task!r}; choose lm or one of {', '.join(TASKS)}")
        if not isinstance(spec, dict) or set(spec) - TASK_KEYS:
            _fail(path, f"[tasks.{task}] may hold only {', '.join(sorted(TASK_KEYS))}")
        _strings(path, f"tasks.{task}.set", spec.get("set", []))
    common = _strings(path, "set", raw.get("set", []))
    seeds = raw.get("seeds", [0])
    threads = raw.get("threads", 1)
    contexts = raw.get("contexts", [])
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        _fail(path, f"threads must be a positive integer, got {threads!r}")
    if not isinstance(contexts, list) or not all(isinstance(c, int) and c > 0 for c in contexts):
        _fail(path, f"contexts must be a list of positive integers, got {contexts!r}")
    cells = raw.get("cells")
    if not isinstance(cells, list) or not cells:
        _fail(path, "a grid needs at least one [[cells]] table")
    if n_seeds is not None and n_seeds < 1:
        raise UserError(f"--seeds must be positive, got {n_seeds}")

    sweep = None
    if "lr_from" in raw:  # a grid file, relative to the working directory or to this file's folder
        found = [p for p in (Path(str(raw["lr_from"])), path.parent / str(raw["lr_from"])) if p.is_file()]
        if not found:
            _fail(path, f"lr_from: no grid file {raw['lr_from']!r}")
        sweep = load_grid(found[0], results_root=results_root)
    expanded, names = [], set()
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict) or not isinstance(cell.get("name"), str) or not cell["name"]:
            _fail(path, f"cell {i + 1} needs a name")
        if cell["name"] in names:
            _fail(path, f"two cells are named {cell['name']!r}")
        names.add(cell["name"])
        lr = cell.get("lr", raw.get("lr"))
        if lr is None and sweep is not None:
            lr = best_lr(sweep, results_root / sweep.name, cell["name"])
            if lr is None:
                print(f"{path}: cell {cell['name']!r} left out: its learning-rate sweep in {sweep.path} has not "
                      "finished", file=sys.stderr)
                continue
        expanded += _expand_cell(path, cell, lr, seeds, list(tasks))
    expanded = [(*e[:3], e[3][:n_seeds], *e[4:]) for e in expanded]  # --seeds N: the first N

    runs = []
    for i in range(max((len(e[3]) for e in expanded), default=0)):
        for cell, label, group, cell_seeds, sets, cell_tasks in expanded:
            if i >= len(cell_seeds):
                continue
            for task in cell_tasks:
                spec = tasks[task]
                every = [*common, *spec.get("set", []), *sets, *overrides, f"train.seed={cell_seeds[i]}",
                         f"train.threads={threads}"]
                runs.append(Run(task, cell, label, group, cell_seeds[i], tuple(every), spec.get("config"),
                                tuple(contexts) if task == LM else (), threads))
    grid = Grid(name, path, runs, raw)
    _check_configs(grid)
    return grid


def _check_configs(grid: Grid) -> None:
    """Every run's config resolves (a bad key or value is found before hours of training)."""
    from .config import load_config
    from .tasks import load_task_config

    for run in {(r.task, r.sets, r.config): r for r in grid.runs}.values():
        try:
            if run.task == LM:
                load_config(None, list(run.sets))
            else:
                load_task_config(run.config, [f"task.name={run.task}", *run.sets])
        except UserError as e:
            raise UserError(f"grid file {grid.path}, cell {run.label!r} on {run.task}: {e}") from None


def best_lr(sweep: Grid, results: Path, cell: str) -> float | None:
    """The learning rate of `cell` with the lowest mean validation bits/byte in the sweep grid's LM
    results (in `results`); None until every run of that cell in the sweep has finished."""
    runs = [r for r in sweep.runs if r.cell == cell and r.task == LM]
    if not runs or not all(is_done(r, results) for r in runs):
        return None
    by_lr: dict[float, list[float]] = {}
    for run in runs:
        result = read_result(run.result_path(results))
        by_lr.setdefault(result["lr"], []).append(result["val_bits_per_byte"])
    return min(by_lr, key=lambda lr: statistics.mean(by_lr[lr]))


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def mixer_defaults(mixer: str) -> dict[str, Any]:
    """The default options of a mixer's constructor, as JSON values: a run's unset options."""
    from .layers import resolve_mixer

    try:
        params = inspect.signature(resolve_mixer(mixer)).parameters.values()
    except ValueError:  # not a mixer: the run itself will say so
        return {}
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
                and p.name not in ("layer_idx", "n_layers")}
    return json.loads(json.dumps(defaults, default=str))


# Options that choose how a mixer computes, not what: its modes are tested to agree to rounding, so
# a new default mode (a faster path) does not make a result stale.
HOW_TO_COMPUTE = ("mode", "chunk_size")
# Options added to every mixer after results were recorded, with the value that means "as before": a
# result recorded without the key ran without the option, so it stays current while the default is that.
ADDED_LATER = {"short_conv": 0}


def is_done(run: Run, results: Path) -> bool:
    """A result exists, made with exactly this run's overrides and under the mixer's current defaults
    (else it is stale, and runs again: a default that changed changes what an unset option meant)."""
    result = read_result(run.result_path(results))
    if result is None or result.get("sets") != list(run.sets):
        return False
    current = mixer_defaults(result["mixer"])
    recorded = result.get("mixer_defaults", current)
    recorded = {**{k: v for k, v in ADDED_LATER.items() if k in current}, **recorded}
    return ({k: v for k, v in recorded.items() if k not in HOW_TO_COMPUTE}
            == {k: v for k, v in current.items() if k not in HOW_TO_COMPUTE})


# --- running ---------------------------------------------------------------------------------------

def run_commands(run: Run, run_dir: Path) -> list[list[str]]:
    """The child processes of one run, in order: train (or resume), then score on the test split."""
    gateloop = [sys.executable, "-m", "gateloop"]
    if run.task != LM:
        cmd = [*gateloop, "task", "run", run.task, "--no-progress", "--out", str(run_dir)]
        cmd += ["--config", run.config] if run.config else []
        return [cmd + [a for s in run.sets for a in ("--set", s)]]
    # A run killed mid-training continues from its last checkpoint (bitwise as if never stopped).
    if (run_dir / ckpt.TRAINER_STATE).exists() and (run_dir / ckpt.CONFIG).exists():
        train = [*gateloop, "train", "--no-progress", "--resume", str(run_dir)]
    else:
        train = [*gateloop, "train", "--no-progress", "--out", str(run_dir)]
        train += [a for s in run.sets for a in ("--set", s)]
    evaluate = [*gateloop, "eval", "--run", str(run_dir), "--split", "test", "--per-position"]
    evaluate += ["--context", *map(str, run.contexts)] if run.contexts else []
    return [train, evaluate]


class Stopped(Exception):
    """The grid was asked to stop (Ctrl-C, SIGTERM) while this run was going."""


# The running children, so that a stop request reaches them (SIGTERM: a trainer saves a checkpoint
# and exits), and the flag that keeps queued runs from starting.
_CHILDREN: set[subprocess.Popen] = set()
_STOP = threading.Event()


def execute(run: Run, runs: Path, results: Path) -> dict:
    """Train and score one run in child processes (with run.threads threads each); write its result."""
    run_dir = run.run_dir(runs)
    resumable = run.task == LM and (run_dir / ckpt.TRAINER_STATE).exists()
    saved = read_result(run_dir / ckpt.CONFIG) if resumable else None
    if run_dir.exists() and not (resumable and saved and _same_run(saved, run)):
        shutil.rmtree(run_dir)  # a task run killed midway, or a run made with other overrides
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(run.threads), "MKL_NUM_THREADS": str(run.threads),
           "PYTHONUNBUFFERED": "1"}
    log = run_dir.with_name(run_dir.name + ".log")
    start = time.perf_counter()
    outputs = []
    with open(log, "a") as f:
        for cmd in run_commands(run, run_dir):
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
            _CHILDREN.add(proc)
            try:
                stdout, _ = proc.communicate()
            finally:
                _CHILDREN.discard(proc)
            f.write(stdout)
            if _STOP.is_set():
                raise Stopped
            if proc.returncode:
                tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
                raise RuntimeError(f"{run.task} {run.label} seed {run.seed}: exit code {proc.returncode} "
                                   f"({tail[0] if tail else 'no output'}); log {log}")
            outputs.append(stdout)
    result = _collect(run, run_dir, outputs[-1], time.perf_counter() - start)
    # One key per line, each value on it: small diffs in git, curves not spread over thousands of lines.
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items()) + "\n}\n"
    atomic_write_text(run.result_path(results), text)
    return result


def _same_run(saved_config: dict, run: Run) -> bool:
    """Whether a run directory's config is what this run's overrides give (safe to resume)."""
    from .config import load_config

    cfg = load_config(None, list(run.sets))
    cfg.model.vocab_size = saved_config.get("model", {}).get("vocab_size")
    return {k: saved_config.get(k) for k in ("model", "data", "train")} == cfg.to_dict()


def _collect(run: Run, run_dir: Path, stdout: str, wall: float) -> dict:
    """The small result file: the run's identity, its final metrics and its learning curve."""
    config = json.loads((run_dir / ckpt.CONFIG).read_text())
    rows = ckpt.read_metrics(run_dir)
    model, train = config["model"], config["train"]
    result = {"grid_cell": run.cell, "label": run.label, "task": run.task, "mixer": model["mixer"],
              "mixer_options": model["mixer_options"], "seed": run.seed, "lr": train["lr"],
              "steps": train["steps"], "threads": run.threads, "sets": list(run.sets),
              "mixer_defaults": mixer_defaults(model["mixer"])}
    if run.task == LM:
        final = next(r for r in reversed(rows) if r.get("final"))
        scores = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
        positions = json.loads((run_dir / "per_position_test.json").read_text())
        result.update(
            parameters=final["parameters"], train_tokens=final["train_tokens"],
            seq_len=train["seq_len"], val_bits_per_byte=final["val_bits_per_byte"],
            test_bits_per_byte=next(s["bits_per_byte"] for s in scores if s["context"] == train["seq_len"])
            if any(s["context"] == train["seq_len"] for s in scores) else scores[0]["bits_per_byte"],
            test_bits_per_byte_at={str(s["context"]): s["bits_per_byte"] for s in scores},
            unigram_bits_per_byte=scores[0]["unigram_bits_per_byte"],
            tokens_per_s=statistics.median(speeds) if speeds else None,
            train_seconds=final["seconds"], wall_seconds=round(wall, 1),
            loss_at_position={c: _log_bins(v) for c, v in positions.items()},
            curve=[{k: r[k] for k in ("step", "seconds", "train_loss", "val_bpb", ACP) if k in r}
                   for r in rows if ("train_loss" in r or "val_bpb" in r) and not r.get("final")]
            + [{"step": final["step"], "seconds": final["seconds"], "val_bpb": final["val_bits_per_byte"]}])
        pruned = [r[ACP] for r in rows if ACP in r]
        if pruned:  # FoX with Adaptive Computation Pruning: the share of attention tiles skipped
            result[ACP] = statistics.fmean(pruned)
        tokens_per_step = final["train_tokens"] / max(final["step"], 1)
        for point in result["curve"]:
            point["tokens"] = int(point["step"] * tokens_per_step)
    else:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        result.update({k: v for k, v in metrics.items() if k not in result and k not in ("task", "steps")},
                      wall_seconds=round(wall, 1),
                      curve=[{k: r[k] for k in ("step", "seconds", "train_loss", "test_accuracy") if k in r}
                             for r in rows if not r.get("final")])
    return result


def _log_bins(losses: list[float]) -> list[list[float]]:
    """[position, mean loss] over log-spaced bins of positions 1..T: a curve of ~48 points, not T."""
    edges = sorted({max(1, round(math.exp(x * math.log(len(losses)) / POSITION_BINS)))
                    for x in range(POSITION_BINS + 1)} | {len(losses) + 1})
    out = []
    for lo, hi in zip(edges, edges[1:]):
        chunk = losses[lo - 1:hi - 1]
        if chunk:
            out.append([round((lo + hi - 1) / 2, 1), round(sum(chunk) / len(chunk), 5)])
    return out


def run_grid(grid: Grid, results: Path, runs: Path, jobs: int = 1, progress: bool = True) -> int:
    """Run every run of the grid not done yet, `jobs` at a time; returns the number that failed.
    Ctrl-C or SIGTERM stops it: queued runs do not start, running ones get SIGTERM (an LM run saves a
    checkpoint, from which the next `gateloop grid` resumes it), then KeyboardInterrupt is raised."""
    todo = [r for r in grid.runs if not is_done(r, results)]
    print(f"{grid.name}: {len(grid.runs) - len(todo)} of {len(grid.runs)} runs done; {len(todo)} to run, "
          f"{jobs} at a time; results in {results}", flush=True)
    failed = 0
    bar = tqdm(total=len(todo), unit="run", disable=not progress, dynamic_ncols=True, smoothing=0)
    _STOP.clear()

    def one(run: Run) -> None:
        nonlocal failed
        if _STOP.is_set():
            return
        try:
            result = execute(run, runs, results)
        except Stopped:
            return
        except RuntimeError as e:
            failed += 1
            tqdm.write(f"FAILED: {e}")
        else:
            score = (f"test {result['test_bits_per_byte']:.4f} bits/byte" if run.task == LM
                     else f"test accuracy {result['test_accuracy']:.3f}")
            tqdm.write(f"{run.task} {run.label} seed {run.seed}: {score} ({result['wall_seconds']:.0f} s)")
        bar.update(1)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    pool = ThreadPoolExecutor(jobs)
    try:
        for future in [pool.submit(one, run) for run in todo]:
            future.result()
    except KeyboardInterrupt:
        _STOP.set()
        for child in list(_CHILDREN):
            child.send_signal(signal.SIGTERM)
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        print(f"{grid.name}: stopped; running runs saved a checkpoint where they could: run the same command "
              "to continue", file=sys.stderr)
        raise
    finally:
        pool.shutdown(wait=True)
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    bar.close()
    return failed


def grid_results(grid: Grid, results: Path) -> list[tuple[Run, dict]]:
    """The finished runs of the grid with their results (stale results left out)."""
    return [(r, read_result(r.result_path(results))) for r in grid.runs if is_done(r, results)]
