"""The package's shape: no import cycles between its modules, and packages that depend only on those below them."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "semgrad_serve"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports anywhere in its source (top level, functions, TYPE_CHECKING)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import sub`` imports the module pkg.sub where there is one
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports() -> None:
    graph = import_graph()
    assert "semgrad_serve.scoring.items" in graph["semgrad_serve.scoring.band_pass"]
    assert "semgrad_serve.scoring.tied_head" in graph["semgrad_serve.scoring.scorer"]  # ``from . import tied_head``
    assert "semgrad_serve.errors" in graph["semgrad_serve.cli"]


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail


# What each top-level part of semgrad_serve may import: the data path top to bottom, model/ and kernels/ at the bottom.
ALLOWED = {
    "errors": set(),
    "jsonl": {"errors"},
    "kernels": {"errors"},
    "model": {"errors"},
    "scoring": {"errors", "kernels", "model"},
    "serving": {"errors", "model", "scoring"},
    "evaluation": {"errors", "jsonl", "model", "scoring"},
    "calibration": {"errors", "jsonl", "model", "scoring", "evaluation"},  # the evaluation prompt
    "commands": {"errors", "jsonl", "kernels", "model", "scoring", "serving", "evaluation", "calibration"},
    "cli": {"errors"},  # the commands are imported by name, one at a time
}


def part(module: str) -> str:
    """The top-level part of semgrad_serve a module belongs to (``semgrad_serve.model.decoder`` → ``model``)."""
    return module.split(".")[1] if "." in module else "__init__"


def test_packages_depend_downward() -> None:
    found = {(part(a), part(b)) for a, targets in import_graph().items() for b in targets if part(a) != part(b)}
    assert {p for p, _ in found} <= set(ALLOWED)
    assert sorted((a, b) for a, b in found if b not in ALLOWED.get(a, set())) == []
