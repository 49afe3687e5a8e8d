"""The modules of halo_compile/, passes/ and kernels/ import one another without a cycle.

A cycle makes the import order matter (a module half-initialised when the other reads it) and
ties modules that can no longer be understood one at a time. Only module-level imports count:
those under `if TYPE_CHECKING:` and those inside functions run after every module is loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {"halo_compile": "halo_compile", "passes": "halo_compile.passes",
            "kernels": "halo_compile.kernels"}


def _module_files() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported: at the top level, or nested in
    if/try blocks there (not under `if TYPE_CHECKING:`, not inside functions or classes)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                pending.extend(node.body)
            pending.extend(node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend([*node.body, *node.orelse, *node.finalbody])
            for handler in node.handlers:
                pending.extend(handler.body)


def _imported_modules(node, module: str, is_package: bool, modules) -> set[str]:
    """The modules of `modules` an import statement loads, absolute: `from .x import y` in a.b
    loads a.x.y when that is a module, else a.x. A package a module lives in is left out: Python
    initialises it before the module, whatever the module imports."""
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    else:
        if node.level:
            parts = module.split(".")
            base = parts if is_package else parts[:-1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module
        names = {f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                 for alias in node.names}
    return {name for name in names
            if name in modules and name != module and not module.startswith(name + ".")}


def import_graph() -> dict[str, set[str]]:
    files = _module_files()
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in _module_level_imports(tree):
            edges |= _imported_modules(node, module, path.stem == "__init__", files)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as the list of its modules (first repeated last), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                return path[path.index(other):] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        path.pop()
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_the_graph_covers_the_packages():
    graph = import_graph()
    assert "halo_compile.kernels.constants" in graph and "halo_compile.passes.manager" in graph
    assert "halo_compile.kernels.scaled_matmul" in graph["halo_compile.kernels.quantized_linear"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_constants_is_a_leaf_and_config_needs_no_kernels():
    graph = import_graph()
    assert graph["halo_compile.kernels.constants"] == set()
    kernels = {m for m in graph if m.startswith("halo_compile.kernels.")}
    assert graph["halo_compile.config"] & kernels <= {"halo_compile.kernels.constants"}


def test_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
