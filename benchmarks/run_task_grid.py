"""Run an experiment grid of synthetic-task runs, and tabulate it (docs/results.md, docs/tasks.md).

    python benchmarks/run_task_grid.py configs/tasks/grid.toml --jobs 2     # run (resumable)
    python benchmarks/run_task_grid.py configs/tasks/grid.toml --report     # markdown tables

The grid file names the tasks (a config file and overrides each), overrides shared by every run,
GateLoop ablations (each run on every task and seed) and the registry's mixers (each with its
default options). Every run is one `gateloop task run` process, with `--config` the task's file and
`--set` the grid's, then the task's, then the run's overrides, in that order. A run whose metrics.json
exists is skipped, so a killed grid continues where it stopped; runs whose resolved configs are
equal are run once (GateLoop's defaults are the "data, complex" ablation). Each finished run also
appends its metrics to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ABLATIONS, MIXER_TABLE = "GateLoop ablations", "Every mixer of the registry"


@dataclass
class Job:
    task: str
    group: str  # the table it goes in: an ablation's `table`, or "Every mixer of the registry"
    label: str
    seed: int
    config: str | None
    sets: list[str]
    out: Path

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gateloop", "task", "run", self.task, "--no-progress", "--out", str(self.out)]
        if self.config:
            cmd += ["--config", self.config]
        for item in self.sets:
            cmd += ["--set", item]
        return cmd


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def _resolved(cfg) -> str:
    """The run's config as a string, mixer options equal to the mixer's defaults left out."""
    from gateloop.layers import MIXERS

    d = cfg.to_dict()
    defaults = {k: p.default for k, p in inspect.signature(MIXERS[cfg.model.mixer]).parameters.items()}
    d["model"]["mixer_options"] = {k: v for k, v in d["model"]["mixer_options"].items() if defaults.get(k) != v}
    return json.dumps(d, sort_keys=True)


def plan(grid: dict, out: Path) -> list[Job]:
    """Every run of the grid, in order: ablations seed by seed (both tasks), then the mixers; runs
    with the same resolved config share one directory."""
    from gateloop.layers import MIXERS
    from gateloop.tasks import load_task_config

    common, every_task = grid.get("set", []), list(grid["tasks"])
    runs = []  # (table, label, seed, overrides, tasks)
    seeds = max((len(a.get("seeds", [0])) for a in grid.get("ablations", [])), default=0)
    for i in range(seeds):
        for ab in grid.get("ablations", []):
            if i < len(ab.get("seeds", [0])):
                runs.append((ab.get("table", ABLATIONS), ab["name"], ab["seeds"][i], ab.get("set", []),
                             ab.get("tasks", every_task)))
    mixers = grid.get("mixers", {})
    names = list(MIXERS) if mixers.get("names", "all") == "all" else mixers["names"]
    for seed in mixers.get("seeds", [0]):
        runs += [(MIXER_TABLE, name, seed, [f"model.mixer={name}"], every_task) for name in names]
    jobs, seen = [], {}
    for i in range(len(runs)):  # run by run, every task: partial results cover both tasks
        for task, spec in grid["tasks"].items():
            group, label, seed, sets, tasks = runs[i]
            if task not in tasks:
                continue
            all_sets = [*common, *spec.get("set", []), *sets, f"train.seed={seed}"]
            resolved = _resolved(load_task_config(spec.get("config"), [f"task.name={task}", *all_sets]))
            path = seen.setdefault(resolved, out / task / f"{_slug(label)}-seed{seed}")
            jobs.append(Job(task, group, label, seed, spec.get("config"), all_sets, path))
    return jobs


def run(jobs: list[Job], out: Path, n_jobs: int) -> None:
    todo, started = {}, time.perf_counter()
    for job in jobs:
        if not (job.out / "metrics.json").exists():
            todo.setdefault(job.out, job)
    print(f"{len(todo)} of {len({j.out for j in jobs})} runs to do, {n_jobs} at a time", flush=True)

    def one(job: Job) -> None:
        if job.out.exists():  # a run killed before it finished: start it again
            shutil.rmtree(job.out)
        job.out.parent.mkdir(parents=True, exist_ok=True)
        log = job.out.with_suffix(".log")
        t0 = time.perf_counter()
        with open(log, "w") as f:
            f.write(" ".join(job.command()) + "\n")
            f.flush()
            code = subprocess.run(job.command(), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if code:
            print(f"FAILED ({code}): {job.task} {job.label} seed {job.seed}; see {log}", flush=True)
            return
        metrics = json.loads((job.out / "metrics.json").read_text())
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps({"task": job.task, "label": job.label, "run": str(job.out), **metrics}) + "\n")
        extra = f", 4x {metrics['test_accuracy_4x']:.3f}" if "test_accuracy_4x" in metrics else ""
        print(f"[{time.perf_counter() - started:6.0f} s] {job.task} {job.label} seed {job.seed}: "
              f"test accuracy {metrics['test_accuracy']:.3f}{extra} ({time.perf_counter() - t0:.0f} s)", flush=True)

    with ThreadPoolExecutor(n_jobs) as pool:
        list(pool.map(one, todo.values()))


def _cell(values: list[float]) -> str:
    """mean +- sample standard deviation (and the range) over seeds; the value alone for one seed."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} "
            f"({min(values):.3f}–{max(values):.3f})")


def report(grid_path: Path, grid: dict, jobs: list[Job]) -> str:
    results = {}
    for job in jobs:
        path = job.out / "metrics.json"
        if path.exists():
            results[(job.task, job.group, job.label, job.seed)] = json.loads(path.read_text())
    lines = [f"Made by `python benchmarks/run_task_grid.py {grid_path} --jobs 2`; runs in `{grid['out']}`; "
             f"shared overrides: `{' '.join(grid.get('set', []))}`; per task: "
             + "; ".join(f"{t}: `--config {s.get('config')}" + "".join(f" --set {x}" for x in s.get("set", [])) + "`"
                         for t, s in grid["tasks"].items()) + ".", ""]
    for group in dict.fromkeys(j.group for j in jobs):
        title = group
        labels = list(dict.fromkeys(j.label for j in jobs if j.group == group))
        cols = []
        for task in dict.fromkeys(j.task for j in jobs if j.group == group):
            cols.append((task, "test_accuracy"))
            if task == "memory_horizon":
                cols.append((task, "test_accuracy_4x"))
        head = [f"{t} {'(4x length)' if m.endswith('4x') else ''}".strip() for t, m in cols]
        lines += [f"### {title}", "", "| run | seeds | " + " | ".join(head) + " | parameters | train s |",
                  "|---|---|" + "---|" * len(cols) + "---|---|"]
        for label in labels:
            rows = {k: v for k, v in results.items() if k[1] == group and k[2] == label}
            seeds = sorted({k[3] for k in rows})
            cells = [_cell([v[metric] for k, v in rows.items() if k[0] == task]) for task, metric in cols]
            params = sorted({v["parameters"] for v in rows.values()})
            secs = [v["train_seconds"] for v in rows.values()]
            lines.append(f"| {label} | {','.join(map(str, seeds)) or '-'} | " + " | ".join(cells) +
                         f" | {'/'.join(f'{p / 1e3:.0f}k' for p in params) or '-'} | "
                         f"{statistics.mean(secs):.0f} |" if secs else f"| {label} | - |" + " - |" * (len(cols) + 2))
        lines.append("")
    return "\n".join(lines)


def plot_curves(grid: dict, jobs: list[Job], table: str, path: Path) -> None:
    """Test accuracy against step, mean over seeds, one line per run of `table`, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [j for j in jobs if j.group == table and (j.out / "metrics.json").exists()]
    tasks = list(dict.fromkeys(j.task for j in chosen))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, label in enumerate(dict.fromkeys(j.label for j in chosen if j.task == task)):
            curves = {}
            for job in (j for j in chosen if j.task == task and j.label == label):
                for line in (job.out / "metrics.jsonl").read_text().splitlines():
                    row = json.loads(line)
                    if "test_accuracy" in row:
                        curves.setdefault(row["step"], []).append(row["test_accuracy"])
            steps = sorted(curves)
            ax.plot(steps, [statistics.mean(curves[s]) for s in steps], marker="os^D"[i // 10 % 4],
                    color=plt.get_cmap("tab10")(i % 10), linestyle="-" if i < 10 else "--", label=label)
        ax.set(title=task, xlabel="step", ylabel="test accuracy (mean over seeds)", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(table)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", help="grid TOML, e.g. configs/tasks/grid.toml")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with train.threads from the grid)")
    parser.add_argument("--report", action="store_true", help="print the markdown tables of the finished runs")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their commands")
    parser.add_argument("--plot", nargs=2, metavar=("TABLE", "PNG"),
                        help="learning curves of one table's runs (e.g. 'GateLoop ablations') into PNG")
    args = parser.parse_args()
    grid = tomllib.loads(Path(args.grid).read_text())
    out = ROOT / grid["out"]
    jobs = plan(grid, out)
    if args.plot:
        plot_curves(grid, jobs, args.plot[0], Path(args.plot[1]))
    elif args.report:
        print(report(Path(args.grid), grid, jobs))
    elif args.dry_run:
        for job in {j.out: j for j in jobs}.values():
            print(" ".join(job.command()))
    else:
        out.mkdir(parents=True, exist_ok=True)
        run(jobs, out, args.jobs)


if __name__ == "__main__":
    main()
