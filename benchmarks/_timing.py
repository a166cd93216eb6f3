"""Shared timing helpers for the benchmark scripts: warm up, repeat, report the median."""

from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"


def median_time(fn, *, warmup: int = 1, repeat: int = 5, budget_s: float = 20.0) -> float:
    """Median wall time of fn() in seconds; fewer repeats when one call is slow."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < repeat and (not times or sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_csv(rows: list[dict], name: str) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / name
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
