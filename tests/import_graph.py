"""The import graph of a Python package read from its source with ``ast`` (nothing is imported): one edge per module
a module imports, imports inside functions included, and the import cycles in it. The same rules as the team's
``import_cycles.py`` tool, so that tests/test_architecture.py and the tool count the same cycles."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def package_modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file for every ``.py`` file under ``package_dir`` (a package's ``__init__.py`` is
    the package's own name), named from ``package_dir``'s name down."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (package_dir.name, *path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> list[str]:
    """Every module name ``module`` imports anywhere in its file (``from a import b`` gives ``a`` and ``a.b``: b
    may be a submodule), relative imports resolved."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return names


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports: each imported name cut back to the longest module of the
    package it names. An import of the top-level package from inside it is no edge (its ``__init__`` has run)."""
    top = next(iter(modules)).split(".")[0] if modules else ""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name in imported_names(module, path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and name != top:
                edges[module].add(name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges) + 100))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found
