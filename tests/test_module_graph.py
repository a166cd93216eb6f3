"""The package's modules form no import cycle (function-level imports included), and none takes
another module's private (underscored) names: what two modules share is public where it belongs."""

from __future__ import annotations

import ast
from pathlib import Path

import gateloop

ROOT = Path(gateloop.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """(module imported, name taken from it) for every import of the project in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "") if sub in known else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return [(m, n) for m, n in found if m in known and m != name]


def test_no_module_takes_private_names():
    known = modules()
    taken = [f"{name} takes {n} from {m}" for name, path in known.items() for m, n in imports(name, path, known)
             if n.startswith("_") and not n.startswith("__")]
    assert not taken, taken


def test_no_import_cycles():
    known = modules()
    edges = {name: {m for m, _ in imports(name, path, known)} for name, path in known.items()}
    state, stack, cycles = {}, [], []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for name in sorted(known):
        if name not in state:
            visit(name)
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    cycles = [c for c in cycles if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> "))]
    assert not cycles, cycles
