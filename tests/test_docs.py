"""The documentation names only what exists.

- ``docs/API.md``: every module, function, class, attribute and parameter listed in its code
  blocks exists with exactly the listed parameters (a ``...`` in a parameter list allows more).
- ``README.md``, ``docs/*.md``, ``perf/README.md``, ``results/README.md`` and every docstring or
  comment in the packages name only repository files that exist.

The code-block grammar of ``docs/API.md`` (one entry a line; an entry continues onto the next
lines while its brackets are open; ``# text`` starts a comment):

- ``# module: pkg.module``: the module of the entries that follow;
- ``def name(params) -> ...``: a function of that module;
- ``class Name(params)``: a class, ``params`` being its constructor's parameters;
- ``exception Name(Base)``: an exception class derived from ``Base``;
- ``NAME: type``: a module attribute;
- indented under a class: ``def name(params)`` (a method), ``name: type`` or ``.a .b .c``
  (attributes or properties).
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
API_DOC = REPO / "docs" / "API.md"
PACKAGES = ("datasets", "diffusion", "methods", "benchmarks")
CODE_DIRS = ("datasets", "diffusion", "methods", "benchmarks", "tests", "perf", "docs", "examples")
PROSE_FILES = (
    "README.md",
    "docs/API.md",
    "perf/README.md",
    "results/README.md",
    "pyproject.toml",
    "tox.ini",
)


# ---------------------------------------------------------------- docs/API.md


def _code_blocks(text: str) -> list[list[str]]:
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _strip_comment(line: str) -> str:
    """The line without its comment (``#`` at the start or after whitespace)."""
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0].rstrip()


def _entries(block: list[str]) -> list[tuple[int, str, int]]:
    """(indent, joined entry text, line index) with continuation lines folded in."""
    out, pending, start = [], "", 0
    for index, raw in enumerate(block):
        if raw.lstrip().startswith("# module:"):
            out.append((0, raw.strip(), index))
            continue
        line = _strip_comment(raw)
        if not line.strip():
            continue
        if pending:
            pending += " " + line.strip()
        else:
            pending, start = line, index
        if pending.count("(") + pending.count("[") <= pending.count(")") + pending.count("]"):
            indent = len(pending) - len(pending.lstrip())
            out.append((indent, pending.strip(), start))
            pending = ""
    assert not pending, f"unbalanced brackets in docs/API.md entry: {pending!r}"
    return out


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in [*parts, current] if p.strip()]


def _listed_parameters(params: str) -> tuple[list[str], bool]:
    names, open_ended = [], False
    for item in _split_top_level(params):
        if item == "...":
            open_ended = True
            continue
        if item in ("*", "/"):
            continue
        names.append(re.split(r"[:=]", item, maxsplit=1)[0].strip().lstrip("*"))
    return names, open_ended


def _parameters_of(obj: object) -> list[str]:
    return [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]


def _check_parameters(where: str, obj: object, params: str) -> list[str]:
    listed, open_ended = _listed_parameters(params)
    actual = _parameters_of(obj)
    if open_ended:
        missing = [p for p in listed if p not in actual]
        return [f"{where}: no parameter(s) {missing}; it has {actual}"] if missing else []
    if listed != actual:
        return [f"{where}: docs list parameters {listed}, the code has {actual}"]
    return []


def _has_attribute(cls: type, name: str) -> bool:
    if hasattr(cls, name):
        return True
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    return any(name in getattr(base, "__annotations__", {}) for base in cls.__mro__)


_DEF = re.compile(r"^def (\w+)\((.*)\)(?:\s*->.*)?$")
_CLASS = re.compile(r"^class (\w+)(?:\((.*)\))?(?:\s*->.*)?$")
_EXCEPTION = re.compile(r"^exception (\w+)\((\w+)\)$")
_ATTRIBUTE = re.compile(r"^(\w+)\s*:\s*.+$")
_DOTTED = re.compile(r"^(\.\w+\s*)+$")


def _check_entry(module, cls, indent: int, text: str) -> tuple[list[str], type | None]:
    """Problems of one entry, and the class that indented entries below it refer to."""
    where = f"{module.__name__}: {text[:60]!r}"
    if indent and cls is None:
        return [f"{where}: indented entry outside a class"], None
    owner = cls if indent else module
    if match := _DEF.match(text):
        name, params = match.groups()
        if not hasattr(owner, name):
            return [f"{where}: {owner.__name__} has no {name!r}"], cls
        return _check_parameters(where, getattr(owner, name), params), cls
    if indent and (_DOTTED.match(text) or _ATTRIBUTE.match(text)):
        names = re.findall(r"\.(\w+)", text) if text.startswith(".") else [text.split(":")[0]]
        return [f"{where}: no attribute {n!r}" for n in names if not _has_attribute(cls, n)], cls
    if match := _EXCEPTION.match(text):
        name, base = match.groups()
        found = getattr(module, name, None)
        expected = getattr(builtins, base, None) or getattr(module, base, None)
        if not (isinstance(found, type) and expected and issubclass(found, expected)):
            return [f"{where}: no exception {name} derived from {base}"], None
        return [], found
    if match := _CLASS.match(text):
        name, params = match.groups()
        found = getattr(module, name, None)
        if not isinstance(found, type):
            return [f"{where}: no class {name!r}"], None
        problems = [] if params is None else _check_parameters(where, found, params)
        return problems, found
    if not indent and (match := _ATTRIBUTE.match(text)):
        name = match.group(1)
        return ([] if hasattr(module, name) else [f"{where}: no attribute {name!r}"]), None
    return [f"{where}: not an entry of the grammar in tests/test_docs.py"], cls


def api_doc_problems(text: str) -> list[str]:
    """Every mismatch between the code blocks of ``text`` (docs/API.md) and the code."""
    problems = []
    for block in _code_blocks(text):
        module = cls = None
        for indent, entry, line in _entries(block):
            if entry.startswith("# module:"):
                module = importlib.import_module(entry.split(":", 1)[1].strip())
                cls = None
                continue
            if module is None:
                problems.append(f"entry before any '# module:' line: {block[line]!r}")
                continue
            found, cls = _check_entry(module, cls, indent, entry)
            problems += found
    return problems


def test_api_doc_lists_only_what_exists():
    problems = api_doc_problems(API_DOC.read_text())
    assert not problems, "docs/API.md is out of date:\n" + "\n".join(problems)


def test_api_doc_covers_every_package():
    modules = set(re.findall(r"# module: ([\w.]+)", API_DOC.read_text()))
    assert {m.split(".")[0] for m in modules} >= set(PACKAGES)


def test_api_check_fails_on_a_wrong_signature():
    doc = "```python\n# module: diffusion.train\ndef learning_rate(config, steps)\n```\n"
    assert any("steps" in p for p in api_doc_problems(doc))
    doc = "```python\n# module: methods\nexception UnknownMethodError(KeyError)\n```\n"
    assert api_doc_problems(doc)  # it derives from LookupError, not KeyError
    doc = "```python\n# module: diffusion.schedule\nclass NoiseSchedule(...)\n    .nope\n```\n"
    assert any("nope" in p for p in api_doc_problems(doc))
    doc = "```python\n# module: diffusion.train\ndef learning_rate(config, step)\n```\n"
    assert api_doc_problems(doc) == []


# ---------------------------------------------------------------- file references

_PATH = re.compile(r"(?<![\w./<-])((?:\.ci|\.github|" + "|".join(CODE_DIRS) + r")/[\w./-]*\w)")


def _referenced_paths(text: str) -> set[str]:
    return {m.group(1) for m in _PATH.finditer(text) if not re.search(r"[<>*{}]", m.group(1))}


def _docstrings_and_comments(path: Path) -> str:
    source = path.read_text()
    parts = [line.split("#", 1)[1] for line in source.splitlines() if "#" in line]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            parts.append(ast.get_docstring(node) or "")
    return "\n".join(parts)


def _python_files() -> list[Path]:
    return [p for d in PACKAGES for p in sorted((REPO / d).rglob("*.py"))]


@pytest.mark.parametrize("name", PROSE_FILES)
def test_prose_names_only_files_that_exist(name):
    missing = sorted(p for p in _referenced_paths((REPO / name).read_text()) if not _exists(p))
    assert not missing, f"{name} names files that do not exist: {missing}"


def test_docstrings_name_only_files_that_exist():
    missing = {
        f"{path.relative_to(REPO)}: {ref}"
        for path in _python_files()
        for ref in _referenced_paths(_docstrings_and_comments(path))
        if not _exists(ref)
    }
    assert not missing, "docstrings/comments name files that do not exist:\n" + "\n".join(
        sorted(missing)
    )


def _exists(reference: str) -> bool:
    return (REPO / reference.rstrip(".")).exists()


def test_reference_check_sees_a_missing_file():
    assert _referenced_paths("see docs/DESIGN.md and methods/builtin.py.") == {
        "docs/DESIGN.md",
        "methods/builtin.py",
    }
    assert not _exists("methods/builtin.py")
