"""The server's modules import one way: no cycles, and the database layer knows nothing of gRPC.

Read from the source (every import, those inside functions too), so a lazy import cannot
hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import adaccounts_server

PACKAGE = Path(next(iter(adaccounts_server.__path__)))  # a namespace package: no __init__.py
NAME = "adaccounts_server"


def imports_of(path: Path) -> set[str]:
    """The package's own modules and the top-level third-party packages `path` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import x / from .x import y
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module:
                found.add(node.module.removeprefix(f"{NAME}.").split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.removeprefix(f"{NAME}.").split(".")[0] for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {path.stem: path for path in PACKAGE.glob("*.py")}
    return {name: imports_of(path) & set(modules) - {name} for name, path in modules.items()}


def test_no_module_imports_itself_back_through_others() -> None:
    edges = graph()
    cycles: list[list[str]] = []

    def walk(module: str, path: list[str], done: set[str]) -> None:
        for imported in sorted(edges[module]):
            if imported in path:
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in done:
                walk(imported, [*path, imported], done)
        done.add(module)

    finished: set[str] = set()
    for module in sorted(edges):
        walk(module, [module], finished)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_database_layer_knows_nothing_of_grpc() -> None:
    """db and replicas raise their own errors; errors.py alone maps them to status codes."""
    edges = graph()
    for module in ("db", "replicas"):
        reachable: set[str] = set()
        stack = [module]
        while stack:
            current = stack.pop()
            if current in reachable:
                continue
            reachable.add(current)
            stack.extend(edges[current])
        for name in reachable:
            third_party = imports_of(PACKAGE / f"{name}.py")
            assert "grpc" not in third_party, f"{module} reaches grpc through {name}"
            assert "service" not in reachable, (module, sorted(reachable))
            assert "errors" not in reachable, (module, sorted(reachable))


def test_the_package_is_as_the_test_reads_it() -> None:
    """The walk above sees the modules that exist, with the imports they have."""
    edges = graph()
    assert {"app", "guard", "service", "repository", "db", "replicas", "errors"} <= set(edges)
    assert "db" in edges["repository"]
    assert "service" in edges["guard"]
