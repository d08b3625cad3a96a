"""Tests that stand alone (issue 14): no test module imports another test module or conftest,
and conftest holds fixtures and pytest hooks only; what tests share besides fixtures is in
tests/helpers. Read from the source, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_test_module_imports_another_or_conftest():
    offenders = {
        str(path.relative_to(TESTS)): sorted(
            module
            for module in imported_modules(path)
            if module == "conftest" or module.split(".")[-1].startswith("test_")
        )
        for path in sorted(TESTS.rglob("*.py"))
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def is_fixture(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "fixture"


def test_conftest_holds_fixtures_and_hooks_only():
    tree = ast.parse((TESTS / "conftest.py").read_text())
    others = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if not (node.name.startswith("pytest_") or any(is_fixture(d) for d in node.decorator_list)):
                others.append(node.name)
        elif isinstance(node, ast.ClassDef):
            others.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            others.append(ast.unparse(node).split("=")[0].strip())
    assert others == [], "not fixtures: move them to tests/helpers"
