"""Refresh the grid tables in the docs from results/: every block

    <!-- report: GRID_FILE -->
    ...
    <!-- end report -->

is replaced by `gateloop grid GRID_FILE --report` (a bare opening marker gets its end).

    python benchmarks/refresh_reports.py docs/leaderboard.md
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BLOCK = re.compile(r"<!-- report: (\S+) -->\n(?:.*?<!-- end report -->\n)?", re.S)


def report(grid: str) -> str:
    out = subprocess.run([sys.executable, "-m", "gateloop", "grid", grid, "--report"], capture_output=True,
                         text=True, check=True).stdout
    # The first line names the command; the docs give it above the block already.
    return out.split("\n", 2)[2].strip() if out.startswith("Grid ") else out.strip()


def main() -> None:
    for name in sys.argv[1:]:
        path = Path(name)
        text = BLOCK.sub(lambda m: f"<!-- report: {m.group(1)} -->\n{report(m.group(1))}\n<!-- end report -->\n",
                         path.read_text())
        path.write_text(text)
        print(f"refreshed {path}")


if __name__ == "__main__":
    main()
