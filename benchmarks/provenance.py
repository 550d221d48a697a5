"""Provenance of every result: code version, packages, machine, and the cost of each stage.

- :func:`collect_provenance`: git commit and dirty flag, Python and package versions, platform,
  CPU count, CUDA device, hostname, UTC time.
- :class:`StageTimer`: context manager measuring a stage's wall seconds and peak memory (host RSS
  sampled by a background thread; CUDA peak allocation when the stage uses CUDA).
- :class:`StageLog`: the stages of one run, by name.
- :func:`stages_to_dict`: stage timings as the run record (``benchmarks.results``) stores them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a declared dependency
    psutil = None

__all__ = [
    "PACKAGES",
    "StageLog",
    "StageTimer",
    "collect_provenance",
    "stages_to_dict",
]

PACKAGES: dict[str, str] = {
    "torch": "torch",
    "numpy": "numpy",
    "curvlinops": "curvlinops-for-pytorch",
    "traker": "traker",
    "open_clip": "open_clip_torch",
    "pandas": "pandas",
    "safetensors": "safetensors",
    "scipy": "scipy",
    "diffusers": "diffusers",
}
"""Reported name -> distribution name of the packages whose versions go into provenance."""

_REPO_DIR = Path(__file__).resolve().parents[1]
_MB = 2.0**20


def _git(args: list[str], repo_dir: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo_dir), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _git_dirty(repo: Path) -> bool | None:
    """Whether tracked files differ from the commit (None when git cannot tell)."""
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo)
    return None if status is None else bool(status)


def _package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cuda_available": bool(torch.cuda.is_available()),
        "cuda_version": torch.version.cuda,
        "cuda_device_count": 0,
        "cuda_device_name": None,
        "torch_num_threads": torch.get_num_threads(),
    }
    if info["cuda_available"]:
        info["cuda_device_count"] = torch.cuda.device_count()
        info["cuda_device_name"] = torch.cuda.get_device_name(0)
    return info


def collect_provenance(repo_dir: str | Path | None = None) -> dict[str, Any]:
    """Where and with what a result was produced.

    Args:
        repo_dir: the git checkout to describe; default: the one holding this file.

    Returns:
        A JSON-able dict with keys ``git_commit`` (hex, or ``"unknown"`` outside git or before
        the first commit), ``git_dirty`` (tracked files modified; None when unknown),
        ``python``, ``packages`` (name -> version or None when not installed, see
        :data:`PACKAGES`; torch's includes its build tag), ``platform``, ``machine``,
        ``cpu_count``, ``device`` (CUDA availability, version, device count and name, torch
        threads), ``hostname``,
        ``timestamp`` (UTC ISO 8601) and ``argv``.
    """
    repo = Path(repo_dir) if repo_dir is not None else _REPO_DIR
    packages = {name: _package_version(dist) for name, dist in PACKAGES.items()}
    packages["torch"] = torch.__version__  # with the build tag (e.g. +cu130) the metadata lacks
    commit = _git(["rev-parse", "HEAD"], repo)
    dirty = _git_dirty(repo) if commit else None
    return {
        "git_commit": commit or "unknown",
        "git_dirty": dirty,
        "python": platform.python_version(),
        "packages": packages,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": _device_info(),
        "hostname": socket.gethostname(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
    }


def with_end_of_run_commit(
    start: Mapping[str, Any], repo_dir: str | Path | None = None
) -> dict[str, Any]:
    """A run's provenance collected at its start, flagged when the checkout changed since.

    A result is made by the code that was checked out when the run started; a commit or an edit
    while it ran (a long ground truth, say) is recorded, not silently attributed to the result.

    Args:
        start: :func:`collect_provenance` at the run's start.
        repo_dir: the git checkout; default: the one holding this file.

    Returns:
        A copy of ``start`` (unchanged when it has no ``git_commit``); where the commit or the
        dirty flag differs now, with
        ``git_commit_at_end``, ``git_dirty_at_end`` and ``git_changed_during_run: True``.
    """
    out = dict(start)
    if "git_commit" not in start:  # not collect_provenance's record: nothing to compare
        return out
    repo = Path(repo_dir) if repo_dir is not None else _REPO_DIR
    commit = _git(["rev-parse", "HEAD"], repo) or "unknown"
    dirty = _git_dirty(repo) if commit != "unknown" else None
    if commit != start.get("git_commit") or dirty != start.get("git_dirty"):
        out.update(git_commit_at_end=commit, git_dirty_at_end=dirty, git_changed_during_run=True)
    return out


# --------------------------------------------------------------------------------------------
# Stage timing and memory
# --------------------------------------------------------------------------------------------


def _rss_reader():
    """A function returning this process's resident set size in bytes."""
    if psutil is not None:
        process = psutil.Process(os.getpid())
        return lambda: int(process.memory_info().rss)
    import resource  # pragma: no cover - deferred: Unix-only, needed only without psutil

    scale = 1 if sys.platform == "darwin" else 1024
    # ru_maxrss is the peak since process start (monotone): an underestimate of the stage's
    # own peak when the process peaked higher earlier.
    return lambda: int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


_CUDA_LOCK = threading.Lock()
_ACTIVE_CUDA_TIMERS: list[StageTimer] = []


class StageTimer:
    """Measure one stage's wall time and peak memory.

    Usage::

        with StageTimer("train") as stage:
            train()
        stage.seconds, stage.peak_memory_mb

    Host memory: the process RSS is sampled every ``sample_interval_s`` by a daemon thread
    (psutil), so allocations by torch and numpy count (tracemalloc would miss them); peaks
    shorter than the interval may be missed. CUDA: when the stage runs on a CUDA device, the
    peak of ``torch.cuda.max_memory_allocated`` during the stage is reported too (nested timers
    stay correct: an inner timer's reset of the peak statistics is folded into outer ones).

    Args:
        name: the stage's name in result files.
        device: the stage's device. None: CUDA is measured iff CUDA is already initialised;
            ``"cpu"``: never; ``"cuda"``/``"cuda:1"``/a torch.device: that device.
        sample_interval_s: RSS sampling period in seconds (> 0).

    Attributes (set on exit):
        seconds: wall time in seconds.
        peak_memory_mb: peak host RSS during the stage minus RSS at its start, MiB (>= 0).
        peak_rss_mb: peak host RSS during the stage, MiB (absolute).
        cuda_peak_memory_mb: peak CUDA memory allocated during the stage minus that at its
            start, MiB; None when the stage did not use CUDA.
    """

    def __init__(
        self,
        name: str = "stage",
        *,
        device: Any = None,
        sample_interval_s: float = 0.02,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"StageTimer name must be a non-empty str, got {name!r}")
        if not sample_interval_s > 0:
            raise ValueError(f"sample_interval_s must be > 0, got {sample_interval_s}")
        self.name = name
        self.device = device
        self.sample_interval_s = float(sample_interval_s)
        self.seconds: float | None = None
        self.peak_memory_mb: float | None = None
        self.peak_rss_mb: float | None = None
        self.cuda_peak_memory_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda_device: Any = None

    # ---- CUDA ------------------------------------------------------------------------------

    def _resolve_cuda_device(self) -> Any:
        if self.device is None:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                return torch.device("cuda", torch.cuda.current_device())
            return None
        device = torch.device(self.device)
        if device.type != "cuda":
            return None
        if not torch.cuda.is_available():
            raise ValueError(f"StageTimer device {self.device!r}: CUDA is not available here")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.device("cuda", index)

    def _cuda_enter(self) -> None:
        dev = self._cuda_device
        torch.cuda.synchronize(dev)
        with _CUDA_LOCK:
            for outer in _ACTIVE_CUDA_TIMERS:
                if outer._cuda_device == dev:
                    outer._cuda_peak = max(outer._cuda_peak, torch.cuda.max_memory_allocated(dev))
            torch.cuda.reset_peak_memory_stats(dev)
            self._cuda_start = torch.cuda.memory_allocated(dev)
            self._cuda_peak = self._cuda_start
            _ACTIVE_CUDA_TIMERS.append(self)

    def _cuda_exit(self) -> None:
        dev = self._cuda_device
        torch.cuda.synchronize(dev)
        with _CUDA_LOCK:
            self._cuda_peak = max(self._cuda_peak, torch.cuda.max_memory_allocated(dev))
            if self in _ACTIVE_CUDA_TIMERS:
                _ACTIVE_CUDA_TIMERS.remove(self)
        self.cuda_peak_memory_mb = max(0, self._cuda_peak - self._cuda_start) / _MB

    # ---- host ------------------------------------------------------------------------------

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.sample_interval_s):
            self._sample()

    def _sample(self) -> None:
        rss = self._read_rss()
        if rss > self._peak_rss:
            self._peak_rss = rss

    def __enter__(self) -> StageTimer:
        if self._thread is not None:
            raise RuntimeError(f"StageTimer {self.name!r} is already running; use a new one")
        self._cuda_device = self._resolve_cuda_device()
        self._read_rss = _rss_reader()
        self._start_rss = self._read_rss()
        self._peak_rss = self._start_rss
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._sample_loop, name=f"StageTimer-{self.name}", daemon=True
        )
        self._thread.start()
        if self._cuda_device is not None:
            self._cuda_enter()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._cuda_device is not None:
            self._cuda_exit()
        self.seconds = time.perf_counter() - self._t0
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.peak_memory_mb = max(0, self._peak_rss - self._start_rss) / _MB
        self.peak_rss_mb = self._peak_rss / _MB
        return False

    def to_dict(self) -> dict[str, Any]:
        """``{"seconds", "peak_memory_mb", "peak_rss_mb", "cuda_peak_memory_mb"}`` (JSON-able)."""
        if self.seconds is None:
            raise RuntimeError(f"StageTimer {self.name!r} has not finished; use it in a with")
        return {
            "seconds": self.seconds,
            "peak_memory_mb": self.peak_memory_mb,
            "peak_rss_mb": self.peak_rss_mb,
            "cuda_peak_memory_mb": self.cuda_peak_memory_mb,
        }


class StageLog:
    """The timed stages of one run, in order.

    Usage::

        log = StageLog()
        with log.stage("train"):
            ...
        write_run_record(path, RunRecord(config, stages=log.to_dict()))  # benchmarks.results
    """

    def __init__(self) -> None:
        self.timers: list[StageTimer] = []

    @contextmanager
    def stage(self, name: str, **timer_kwargs: Any) -> Iterator[StageTimer]:
        """Time a stage (keyword arguments go to :class:`StageTimer`); names must be unique."""
        if any(t.name == name for t in self.timers):
            raise ValueError(f"stage {name!r} was already recorded; use a distinct name")
        timer = StageTimer(name, **timer_kwargs)
        self.timers.append(timer)
        with timer:
            yield timer

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Stage name -> :meth:`StageTimer.to_dict`, for finished stages."""
        return {t.name: t.to_dict() for t in self.timers if t.seconds is not None}


def stages_to_dict(
    stages: StageLog | Iterable[StageTimer] | Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Stage name -> timing dict (``seconds``, ``peak_memory_mb``, ...), in stage order.

    Args:
        stages: a :class:`StageLog`, finished :class:`StageTimer` s (names must be unique), or
            a dict name -> timing dict.
    """
    if isinstance(stages, StageLog):
        return stages.to_dict()
    if isinstance(stages, Mapping):
        return {str(k): dict(v) for k, v in stages.items()}
    out: dict[str, Any] = {}
    for timer in stages:
        if timer.name in out:
            raise ValueError(f"two stages are named {timer.name!r}; stage names must be unique")
        out[timer.name] = timer.to_dict()
    return out
