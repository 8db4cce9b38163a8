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
    "sps_scan": {"errors", "jsonl", "model", "scoring", "evaluation"},  # the evaluation prompt
    "commands": {"errors", "jsonl", "kernels", "model", "scoring", "serving", "evaluation", "sps_scan"},
    "cli": {"errors"},  # the commands are imported by name, one at a time
    "testing": {"errors", "model", "scoring", "commands"},  # helpers of the tests and benchmarks, above the rest
}


def part(module: str) -> str:
    """The top-level part of semgrad_serve a module belongs to (``semgrad_serve.model.decoder`` → ``model``)."""
    return module.split(".")[1] if "." in module else "__init__"


def test_packages_depend_downward() -> None:
    found = {(part(a), part(b)) for a, targets in import_graph().items() for b in targets if part(a) != part(b)}
    assert {p for p, _ in found} <= set(ALLOWED)
    assert sorted((a, b) for a, b in found if b not in ALLOWED.get(a, set())) == []


def external_imports() -> dict[str, set[str]]:
    """Module → the top-level names of the packages outside semgrad_serve it imports anywhere in its source."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
        found[module_name(path)] = names - {PACKAGE.name}
    return found


def closure(graph: dict[str, set[str]], root: str) -> set[str]:
    """The package's modules that importing ``root`` may import: those it imports, theirs, and so on, each with the
    packages above it (whose ``__init__`` runs first)."""
    seen: set[str] = set()
    stack = [root]
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        stack += [*graph[module], *(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in graph)]
    return seen


SERVING = f"{PACKAGE.name}.serving"
# The modules vLLM's API server process imports: the plugin and everything it reaches, and what the worker shares.
API_SERVER_SIDE = (f"{SERVING}.api_server", f"{SERVING}.messages", f"{SERVING}.settings", f"{SERVING}.capture_keys")


def api_server_side_offenders(graph: dict[str, set[str]], roots: list[str]) -> dict[str, list[str]]:
    """Per root, the modules in its import closure that import torch or belong to ``serving.worker``."""
    external = external_imports()
    found = {}
    for root in roots:
        bad = [m for m in closure(graph, root) if "torch" in external[m] or m.startswith(f"{SERVING}.worker")]
        if bad:
            found[root] = sorted(bad)
    return found


def test_the_api_server_side_never_imports_torch_nor_the_worker() -> None:
    """The API server process runs no scoring maths: nothing it imports of this package imports torch (whose import
    alone costs it memory and start-up time) or the worker side."""
    graph = import_graph()
    roots = [m for m in graph if m == API_SERVER_SIDE[0] or m.startswith(f"{API_SERVER_SIDE[0]}.")]
    assert len(roots) > 5  # the plugin, its routes, the client ...
    assert api_server_side_offenders(graph, [*roots, *API_SERVER_SIDE[1:]]) == {}
    # the check can fail: the worker extension imports torch (through the scorer) and is the worker side
    extension = f"{SERVING}.worker.extension"
    assert extension in api_server_side_offenders(graph, [extension])[extension]


def test_every_module_name_appears_once() -> None:
    """A module's file name says what it holds, once in the package (``__init__.py`` aside)."""
    names = [p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    assert sorted({n for n in names if names.count(n) > 1}) == []
