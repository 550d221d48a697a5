"""Docstrings of the public API: a public function of more than two arguments documents them.

Ruff's pydocstyle rules (``D``, Google convention, ``tox -e lint``) check the form of every
docstring and that an ``Args:`` section names every argument; they do not require the section.
This test does: every public function or method of the four packages that takes more than two
arguments (``self``/``cls`` not counted) has an ``Args:`` section, and a ``Returns:`` (or
``Yields:``) section unless it is annotated to return None.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("datasets", "diffusion", "methods", "benchmarks")


def _public_modules() -> list[Path]:
    return [
        path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if not path.name.startswith("_") or path.name in ("__init__.py", "__main__.py")
    ]


def _arguments(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return [name for name in names if name not in ("self", "cls")]


def _returns_value(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    returns = node.returns
    return returns is not None and not (isinstance(returns, ast.Constant) and returns.value is None)


def _missing_sections(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    doc = ast.get_docstring(node) or ""
    missing = [] if "Args:" in doc else ["Args"]
    if _returns_value(node) and "Returns:" not in doc and "Yields:" not in doc:
        missing.append("Returns")
    return missing


def _public_functions(body: list[ast.stmt], prefix: str = ""):
    for node in body:
        if getattr(node, "name", "_").startswith("_"):
            continue
        if isinstance(node, ast.ClassDef):
            yield from _public_functions(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield f"{prefix}{node.name}", node


def undocumented_arguments() -> list[str]:
    """``path:line name [sections]`` of every public function missing a section."""
    problems = []
    for path in _public_modules():
        tree = ast.parse(path.read_text())
        for name, node in _public_functions(tree.body):
            if len(_arguments(node)) > 2 and (missing := _missing_sections(node)):
                problems.append(f"{path.relative_to(REPO)}:{node.lineno} {name} {missing}")
    return problems


def test_public_functions_of_more_than_two_arguments_document_them():
    problems = undocumented_arguments()
    assert not problems, "add Args:/Returns: sections:\n" + "\n".join(problems)


def test_the_check_sees_a_missing_section():
    tree = ast.parse('def f(a, b, c) -> int:\n    """Sum."""\n')
    assert _missing_sections(tree.body[0]) == ["Args", "Returns"]
    tree = ast.parse('def f(a, b, c) -> None:\n    """Sum.\n\n    Args:\n        a: x\n    """\n')
    assert _missing_sections(tree.body[0]) == []
