"""Tables and plots of a grid's results: `gateloop grid FILE --report` and `--plot PNG`.

Everything here reads the result files alone (results/<grid>/...), never the run directories, so
the tables and plots are remade from the repository on any machine.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .errors import UserError
from .grid import LM, Grid, Run, grid_results
from .plots import pyplot, save_png


def spread(values: list[float], digits: int = 3) -> str:
    """mean ± sample standard deviation (min–max) over seeds; the value alone for one seed."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} "
            f"({min(values):.{digits}f}–{max(values):.{digits}f})")


def _by_label(rows: list[tuple[Run, dict]], task: str, group: str | None = None) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for run, result in rows:
        if run.task == task and group in (None, run.group):
            out.setdefault(run.label, []).append(result)
    return out


def _mean(results: list[dict], key: str) -> float:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.mean(values) if values else float("nan")


def report(grid: Grid, results: Path, command: str) -> str:
    """Markdown: one table per task, best first, every figure a mean over the seeds that finished."""
    rows = grid_results(grid, results)
    n_planned = len(grid.runs)
    lines = [f"Grid `{grid.name}` ({grid.path}): {len(rows)} of {n_planned} runs finished. Remake the runs "
             f"with `{command}` and this table with `{command} --report`.", ""]
    for task, group in dict.fromkeys((r.task, r.group) for r in grid.runs):
        groups = _by_label(rows, task, group)
        title = f"{'Language model' if task == LM else task}{f': {group}' if group else ''}"
        lines += _lm_table(title, groups) if task == LM else _task_table(title, groups)
        lines.append("")
    return "\n".join(lines)


def _lm_table(title: str, groups: dict[str, list[dict]]) -> list[str]:
    contexts = sorted({int(c) for rs in groups.values() for r in rs for c in r["test_bits_per_byte_at"]})
    seq_lens = {r["seq_len"] for rs in groups.values() for r in rs}
    extra = [c for c in contexts if c not in seq_lens]
    pruning = any("acp_pruned_fraction" in r for rs in groups.values() for r in rs)  # FoX with ACP
    head = ["#", "model", "n", "test bits/byte", "val bits/byte", *(f"test at context {c}" for c in extra),
            *(["attention pruned"] if pruning else []), "parameters", "tokens/s", "train time"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(groups, key=lambda label: _mean(groups[label], "test_bits_per_byte"))
    for i, label in enumerate(order, 1):
        rs = groups[label]
        columns = [spread([r["test_bits_per_byte_at"][str(c)] for r in rs if str(c) in r["test_bits_per_byte_at"]])
              for c in extra]
        if pruning:  # the mean share of attention tiles skipped over training; 0 without ACP
            columns.append(spread([r.get("acp_pruned_fraction", 0.0) for r in rs]))
        params = sorted({r["parameters"] for r in rs})
        lines.append(f"| {i} | {label} | {len(rs)} | {spread([r['test_bits_per_byte'] for r in rs])} | "
                     f"{spread([r['val_bits_per_byte'] for r in rs])} | " + "".join(f"{c} | " for c in columns) +
                     f"{'/'.join(f'{p / 1e6:.3f}M' for p in params)} | {_mean(rs, 'tokens_per_s'):,.0f} | "
                     f"{_mean(rs, 'train_seconds') / 60:.1f} min |")
    # Where a cell was swept (several labels per cell), the value each cell's validation score picks.
    cells: dict[str, list[str]] = {}
    for label, rs in groups.items():
        cells.setdefault(rs[0]["grid_cell"], []).append(label)
    swept = {c: ls for c, ls in cells.items() if len(ls) > 1}
    if swept:
        lines += ["", "Chosen by the validation split (lowest mean val bits/byte of each cell's sweep):", "",
                  "| cell | chosen | val bits/byte | the others |", "|---|---|---|---|"]
        for cell, labels in swept.items():
            ranked = sorted(labels, key=lambda label: _mean(groups[label], "val_bits_per_byte"))
            others = ", ".join(f"{label.removeprefix(cell).strip()}: {_mean(groups[label], 'val_bits_per_byte'):.3f}"
                               for label in ranked[1:])
            lines.append(f"| {cell} | {ranked[0].removeprefix(cell).strip()} | "
                         f"{_mean(groups[ranked[0]], 'val_bits_per_byte'):.3f} | {others} |")
    return lines


def _task_table(title: str, groups: dict[str, list[dict]]) -> list[str]:
    long = any("test_accuracy_4x" in r for rs in groups.values() for r in rs)
    head = ["#", "model", "n", "test accuracy", *(["at 4x length"] if long else []), "parameters", "train time"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(groups, key=lambda label: -_mean(groups[label], "test_accuracy"))
    for i, label in enumerate(order, 1):
        rs = groups[label]
        cells = [spread([r["test_accuracy"] for r in rs])]
        if long:
            cells.append(spread([r["test_accuracy_4x"] for r in rs if "test_accuracy_4x" in r]))
        params = sorted({r["parameters"] for r in rs})
        lines.append(f"| {i} | {label} | {len(rs)} | " + " | ".join(cells) +
                     f" | {'/'.join(f'{p / 1e3:.0f}k' for p in params)} | {_mean(rs, 'train_seconds'):.0f} s |")
    return lines


def _band(ax, curves: list[list[tuple[float, float]]], label: str, color) -> None:
    """The mean over seeds of curves sampled at the same points, with the seeds' min-max as a band."""
    n = min(len(c) for c in curves)
    xs = [statistics.mean(c[i][0] for c in curves) for i in range(n)]
    ys = [[c[i][1] for c in curves] for i in range(n)]
    ax.plot(xs, [statistics.mean(y) for y in ys], color=color, label=label)
    if len(curves) > 1:
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2, linewidth=0)


def plot(grid: Grid, results: Path, path: Path) -> None:
    """One row of panels per task: the learning curve against tokens (or steps) and against training
    time, mean over seeds with the min-max band; the final score per model with its std as error bar;
    for the language model, the test loss at each position of the longest context."""
    plt = pyplot()
    rows = grid_results(grid, results)
    tasks = list(dict.fromkeys(r.task for r, _ in rows))
    if not tasks:
        raise UserError(f"no finished runs of {grid.name} in {results}: nothing to plot")
    fig, axes = plt.subplots(len(tasks), 4, figsize=(22, 4.8 * len(tasks)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax_row, task in zip(axes, tasks):
        groups = _by_label(rows, task)
        lm = task == LM
        metric, y_curve = ("test_bits_per_byte", "val_bpb") if lm else ("test_accuracy", "test_accuracy")
        order = sorted(groups, key=lambda label: _mean(groups[label], metric) * (1 if lm else -1))
        for i, label in enumerate(order):
            rs, color = groups[label], cmap(i % 20)
            x_key = "tokens" if lm else "step"
            for ax, key in ((ax_row[0], x_key), (ax_row[1], "seconds")):
                curves = [[(p[key], p[y_curve]) for p in r["curve"] if y_curve in p and key in p] for r in rs]
                if all(curves):
                    _band(ax, curves, label, color)
            if lm:
                longest = max(rs[0]["loss_at_position"], key=int)
                curves = [[tuple(p) for p in r["loss_at_position"][longest]] for r in rs]
                _band(ax_row[3], curves, label, color)
        values = [[r[metric] for r in groups[label]] for label in order]
        ax_row[2].barh(range(len(order)), [statistics.mean(v) for v in values],
                       xerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values],
                       color=[cmap(i % 20) for i in range(len(order))], capsize=3)
        ax_row[2].set_yticks(range(len(order)), order, fontsize=8)
        ax_row[2].invert_yaxis()
        lo = min(min(v) for v in values)
        if lm:
            ax_row[2].set_xlim(lo - 0.1, max(max(v) for v in values) + 0.05)
        ylabel = "validation bits/byte" if lm else "test accuracy"
        ax_row[0].set(xlabel="training tokens" if lm else "step", ylabel=ylabel, title=f"{task}: against data")
        ax_row[1].set(xlabel="training seconds (one run's own threads)", ylabel=ylabel,
                      title=f"{task}: against time")
        ax_row[2].set(xlabel=("test bits/byte" if lm else "test accuracy") + " (mean, std over seeds)",
                      title=f"{task}: final score")
        if lm:
            ax_row[3].set(xscale="log", xlabel=f"position in a window of {longest} test tokens",
                          ylabel="test loss (nats/token)", title="loss at each position (length extrapolation)")
        else:
            ax_row[3].axis("off")
        for ax in (ax_row[0], ax_row[1], ax_row[3]):
            ax.grid(alpha=0.3)
        ax_row[0].legend(fontsize=7)
        if lm:
            bottom = min(min(p["val_bpb"] for p in r["curve"] if "val_bpb" in p) for rs in groups.values() for r in rs)
            for ax in ax_row[:2]:
                ax.set_ylim(bottom - 0.05, bottom + 1.5)
    fig.suptitle(f"grid {grid.name}")
    fig.tight_layout()
    save_png(fig, path, dpi=100)
