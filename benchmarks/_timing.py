"""Shared helpers for the benchmark scripts: the median timer, CSV output, markdown tables."""

from __future__ import annotations

import csv
from pathlib import Path

from gateloop.bench import median_time  # noqa: F401  (re-exported for the scripts)

OUT = Path(__file__).parent / "out"


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
