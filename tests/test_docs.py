"""Every project file the code and docs cite exists in the repository: a user of the package has
nothing else (a citation of a file outside it, or of one since renamed, fails here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("src", "docs", "configs", "benchmarks", "tests", "ops", "layers", "models", "data", ".ci")
# A path of the project: from one of its top-level folders (or a package subfolder, as module
# docstrings write them), or a bare upper-case document name such as README.md.
CITED = re.compile(r"(?<![\w./~-])((?:(?:%s)/(?:[\w.-]+/)*[\w.-]+\.(?:md|py|toml|png|cpp|sh))|[A-Z][A-Z_]+\.md)"
                   r"(?![\w/])" % "|".join(re.escape(t) for t in TOP))
GENERATED = ("benchmarks/out/",)  # written by the benchmark scripts


def citing_files() -> list[Path]:
    return [*ROOT.glob("src/**/*.py"), *ROOT.glob("src/**/*.md"), *ROOT.glob("docs/**/*.md"),
            *ROOT.glob("configs/**/*.toml"), *ROOT.glob("benchmarks/*.py"), ROOT / "README.md"]


def test_every_cited_path_exists():
    missing = []
    for f in citing_files():
        for match in CITED.finditer(f.read_text()):
            path = match.group(1)
            if path.startswith(GENERATED):
                continue
            places = [ROOT / path, ROOT / "src" / "gateloop" / path, f.parent / path]
            if not any(p.exists() for p in places):
                missing.append(f"{f.relative_to(ROOT)}: {path}")
    assert not missing, "cited files that do not exist:\n" + "\n".join(missing)


def test_the_pattern_finds_citations():
    text = "see docs/models/gateloop.md, ops/scan.py and MODELS.md; not runs/x/config.json or a.png"
    assert [m.group(1) for m in CITED.finditer(text)] == ["docs/models/gateloop.md", "ops/scan.py", "MODELS.md"]
