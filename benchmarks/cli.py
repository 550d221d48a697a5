"""Shared command-line plumbing: usage errors become one clear line and exit status 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from benchmarks.errors import UsageError
from benchmarks.executors import EXECUTOR_NAMES, TaskFailedError
from benchmarks.groundtruth import DEFAULT_ENSEMBLE_SIZE
from benchmarks.settings import PRESETS
from benchmarks.store import CacheMismatchError, CorruptArtifactError
from datasets import DatasetUnavailableError
from methods import UnknownMethodError

USAGE_ERRORS = (UsageError, UnknownMethodError, DatasetUnavailableError)
"""Bad input: a bad flag, an unknown name or a bad value (datasets/ and methods/ cannot import
:class:`UsageError`, so their own user-facing errors are listed too)."""


@contextmanager
def usage_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Turn bad input into ``prog: error: <message>`` and exit status 2.

    Usage errors (:data:`USAGE_ERRORS`) and unusable cache entries become one line and exit
    status 2 (argparse's own convention); failed tasks exit with status 1 and name the failed
    keys. Any other exception is a bug: it propagates with its traceback (exit status 1). Work
    already done is in the artifact store either way, so the same command resumes after the fix.
    """
    try:
        yield
    except (*USAGE_ERRORS, CacheMismatchError, CorruptArtifactError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except TaskFailedError as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _parse_value(text: str) -> Any:
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(
                f"{text!r} is not a JSON list ({e.msg}): write e.g. [16,32] or "
                '["DownBlock2D","AttnDownBlock2D"]'
            ) from None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (ints, floats, true/false/none parsed).

    A value starting with ``[`` is a JSON list: ``unet.block_out_channels=[16,32]``.
    """
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, got {pair!r}")
        out[key] = _parse_value(value)
    return out


def nest_overrides(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"train.steps": 20, "n_subsets": 8}`` -> ``{"train": {"steps": 20}, "n_subsets": 8}``.

    This is the form ``Setting.replace`` takes for nested configs.
    """
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        head, dot, rest = key.partition(".")
        if not dot:
            nested[key] = value
            continue
        if "." in rest:
            raise UsageError(f"--set {key}: only one level of nesting (e.g. train.steps)")
        branch = nested.setdefault(head, {})
        if not isinstance(branch, dict):
            raise UsageError(f"--set {head} and --set {key} conflict; give one of them")
        branch[rest] = value
    return nested


def run_label(methods: tuple[str, ...]) -> str:
    """A result file stem: UTC time and the methods (``all-<n>-methods`` beyond three)."""
    names = "-".join(methods) if len(methods) <= 3 else f"all-{len(methods)}-methods"
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + names


DEFAULT_CACHE_DIR = ".cache/harness"


@dataclass(frozen=True)
class RunOptions:
    """Where and how a runner works (shared by the LDS and retraining runners).

    Attributes:
        out: directory for the result tables.
        cache_dir: artifact store directory.
        data_dir: where CIFAR-10 lives (``cifar-10-batches-py``), if not downloadable.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        executor: ``auto`` (a process pool over every core when the machine has several, else
            in-process), ``local``, ``pool`` or ``ray`` for the retraining tasks.
        workers: processes of the pool / CPUs of a local Ray cluster; None = every core.
        ray_address: address of an existing Ray cluster.
        overrides: setting overrides (``n_subsets=64``), applied to the preset.
        threads: torch intra-op threads in this process (None: 1 for the digits presets, whose
            models are so small that one thread is fastest, else torch's default).
        progress: show progress bars.
        ensemble_size: ground-truth models trained together in one task, vmapped (harness
            U-Nets without dropout; ``groundtruth.compute_ground_truth``). The models and their
            keys do not depend on it (bitwise on the CPU); a larger one fills a GPU.
    """

    out: str = "results"
    cache_dir: str = DEFAULT_CACHE_DIR
    data_dir: str | None = None
    device: str = "auto"
    executor: str = "auto"
    workers: int | None = None
    ray_address: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    progress: bool = True
    ensemble_size: int = DEFAULT_ENSEMBLE_SIZE

    def __post_init__(self) -> None:
        if self.ensemble_size < 1:
            raise UsageError(f"--ensemble-size must be >= 1, got {self.ensemble_size}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {self.workers}")


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    """``--preset NAME`` (default quick), its help listing every preset of :data:`PRESETS`."""
    parser.add_argument("--preset", default="quick", help=" | ".join(PRESETS))


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of :class:`RunOptions`."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        dest="overrides",
        help="setting override, e.g. n_subsets=64 or unet.block_out_channels=[16,32]",
    )
    parser.add_argument("--out", default="results", help="directory of result tables")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="artifact store")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="directory holding cifar-10-batches-py (CIFAR presets offline)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument(
        "--executor",
        default="auto",
        choices=list(EXECUTOR_NAMES),
        help="where retraining tasks run (auto: a process pool over every core when the "
        "machine has several, else in-process)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="pool / local Ray workers (default: every core)"
    )
    parser.add_argument("--ray-address", default=None, help="existing Ray cluster address")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 for the digits presets, else all)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--ensemble-size",
        type=int,
        default=DEFAULT_ENSEMBLE_SIZE,
        help="ground-truth models trained together per task (vmapped harness U-Nets; larger "
        "fills a GPU; the results do not depend on it)",
    )


def run_option_values(args: argparse.Namespace) -> dict[str, Any]:
    """:class:`RunOptions` fields from arguments parsed with :func:`add_run_arguments`."""
    return {
        "out": args.out,
        "cache_dir": args.cache_dir,
        "data_dir": args.data_dir,
        "device": args.device,
        "executor": args.executor,
        "workers": args.workers,
        "ray_address": args.ray_address,
        "overrides": nest_overrides(parse_key_values(args.overrides, "--set")),
        "threads": args.threads,
        "progress": not args.no_progress,
        "ensemble_size": args.ensemble_size,
    }
