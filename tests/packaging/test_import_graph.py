"""The house plan as a test: which rooms may import which, and no import circle anywhere.

Imports are read from the sources (``ast``), at every level: a circle hidden behind a function-level import is
still a circle (it only moves the failure from import time to the first call, and it hides a design that
should be one module or two with an interface between them). Importing a submodule also runs its package's
``__init__``; that implicit edge is left out, so a package may re-export its own submodules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "worker", "bench", "tests/support")

# room -> the top-level names of ours it must never import (docs/architecture.md, "House plan").
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "app": ("worker", "bench", "tests", "tensorflow", "keras", "tf_keras"),
    "worker": ("bench", "tests", "app.api", "app.cli", "app.main", "app.client"),
    "worker.pruning": ("celery", "fastapi", "sqlalchemy", "app.db", "app.storage", "worker.stages", "worker.tasks"),
    "worker.evaluation": ("celery", "fastapi", "sqlalchemy", "app.db", "app.storage", "worker.stages"),
    "worker.structure": ("celery", "fastapi", "sqlalchemy", "app.db", "app.storage", "worker.stages"),
    "worker.data": ("celery", "fastapi", "sqlalchemy", "app.db", "worker.stages", "worker.tasks"),
    "app.storage": ("app.api", "app.db", "starlette", "fastapi", "multipart", "python_multipart"),
    "app.db": ("app.api", "fastapi"),
    "app.client": ("app.api", "app.db", "app.storage", "fastapi", "sqlalchemy"),
    "bench": ("tests.conftest", "tests.e2e", "tests.faults", "tests.app", "tests.worker"),
    "tests.support": ("tests.conftest",),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """Every name ``module`` imports (absolute, resolved to a module of ours when it is one), with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in known else base), node.lineno


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {
        module: {name for name, _ in _imports(module, path, known) if name in known and name != module}
        for module, path in sources.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circle_in_app_worker_bench() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    """The check above cannot pass by finding nothing."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert len(_graph()) > 100 and sum(map(len, _graph().values())) > 300


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_only_what_the_house_plan_allows(room: str) -> None:
    sources = _sources()
    known = set(sources)
    offenders = []
    for module, path in sources.items():
        if not (module == room or module.startswith(room + ".")):
            continue
        # a room's rules apply with those of the rooms around it (worker.pruning is also worker)
        banned = [b for r, bs in FORBIDDEN.items() if room == r or room.startswith(r + ".") for b in bs]
        for name, line in _imports(module, path, known):
            if any(name == b or name.startswith(b + ".") for b in banned):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert offenders == []
