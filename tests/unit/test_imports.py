"""The shape of src/blindfold's imports: no cycle anywhere (every import counts: at module
level, inside functions, under TYPE_CHECKING), nothing imports the edge worker, and the edge's
modes are imported by their registry alone (the worker and check-config go through it)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "blindfold").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (a name inside a module counts as the module;
    a submodule importing its own package does not count: Python runs the package first)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([base] if base else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != mod and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle_through_a_type_checking_import() -> None:
    """(The checker itself: a cycle closed only by a function-local or TYPE_CHECKING import
    is still a cycle.)"""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_src_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_nothing_imports_the_worker_and_only_the_registry_imports_the_modes() -> None:
    graph = import_graph()
    assert [m for m, deps in graph.items() if "blindfold.edge.worker" in deps] == []
    modes = {m for m in graph if m.startswith("blindfold.edge.modes.")}
    assert modes >= {
        "blindfold.edge.modes.passthrough",
        "blindfold.edge.modes.keyless",
        "blindfold.edge.modes.blind",
    }
    importers = {m for m, deps in graph.items() if deps & modes}
    assert importers == {"blindfold.edge.modes"}
    registry_users = {m for m, deps in graph.items() if "blindfold.edge.modes" in deps}
    # (obs.catalog lists every process's metrics for the dashboards' and alerts' check)
    assert registry_users == {
        "blindfold.edge.worker",
        "blindfold.cli.main",
        "blindfold.obs.catalog",
    }
