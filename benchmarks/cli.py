"""Shared command-line plumbing: usage errors become one clear line and exit status 2."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def usage_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Turn bad input into ``prog: error: <message>`` and exit status 2 (argparse's own
    convention); failed tasks exit with status 1 and name the failed keys. Work already done is
    in the artifact store either way, so the same command resumes after the fix."""
    from benchmarks.executors import TaskFailedError
    from benchmarks.store import CacheMismatchError, CorruptArtifactError
    from datasets import DatasetUnavailableError
    from methods import UnknownMethodError

    try:
        yield
    except (
        UnknownMethodError,
        DatasetUnavailableError,
        CacheMismatchError,
        CorruptArtifactError,
        ValueError,
    ) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except TaskFailedError as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (ints, floats, true/false/none parsed)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {pair!r}")
        out[key] = _parse_value(value)
    return out


def nest_overrides(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"train.steps": 20, "n_subsets": 8}`` -> ``{"train": {"steps": 20}, "n_subsets": 8}``
    (the form ``Setting.replace`` takes for nested configs)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        head, dot, rest = key.partition(".")
        if not dot:
            nested[key] = value
            continue
        if "." in rest:
            raise ValueError(f"--set {key}: only one level of nesting (e.g. train.steps)")
        branch = nested.setdefault(head, {})
        if not isinstance(branch, dict):
            raise ValueError(f"--set {head} and --set {key} conflict; give one of them")
        branch[rest] = value
    return nested


def run_label(methods: tuple[str, ...]) -> str:
    """A result file stem: UTC time and the methods (``all-<n>-methods`` beyond three)."""
    names = "-".join(methods) if len(methods) <= 3 else f"all-{len(methods)}-methods"
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + names
