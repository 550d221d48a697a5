"""Code layout rules that keep the runners readable (issue 15): small functions, imports on top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
MAX_FUNCTION_LINES = 80
RUNNERS = ("lds.py", "retrain.py", "runner.py")
REPO = BENCHMARKS.parent
TOP_IMPORT_MODULES = tuple(
    str(path.relative_to(REPO))
    for package in ("datasets", "diffusion", "methods", "benchmarks")
    for path in sorted((REPO / package).rglob("*.py"))
)


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize("name", RUNNERS)
def test_runner_functions_are_short(name):
    tree = ast.parse((BENCHMARKS / name).read_text())
    long = {
        f.name: f.end_lineno - f.lineno + 1
        for f in _functions(tree)
        if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert not long, f"{name}: functions longer than {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("name", TOP_IMPORT_MODULES)
def test_imports_sit_at_the_top_unless_deferred_on_purpose(name):
    """An import inside a function is allowed only with a comment saying it is deferred."""
    source = (REPO / name).read_text()
    lines = source.splitlines()
    inner = [
        node
        for f in _functions(ast.parse(source))
        for node in ast.walk(f)
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]
    unexplained = [
        f"line {node.lineno}: {lines[node.lineno - 1].strip()}"
        for node in inner
        if "deferred" not in lines[node.lineno - 1]
    ]
    assert not unexplained, f"{name}: imports inside functions: {unexplained}"
