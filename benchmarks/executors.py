"""Where retraining and measurement tasks run: in-process, a local process pool, or Ray.

Every task is a top-level function applied to a small picklable argument, and is idempotent by
its artifact key: it first looks in the artifact store and returns the stored result if the
work was done before (by this run, an earlier killed run, or another worker). So the executors
only have to run functions; resumption is the store's job.

Failures: a task that raises is retried up to ``max_retries`` times (Ray: its own
``max_retries`` + ``retry_exceptions``), then reported by key in the returned outcomes; the
other tasks complete. No home-made scheduler: the pool is ``concurrent.futures``, the cluster
is Ray.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

EXECUTOR_NAMES = ("auto", "local", "pool", "ray")


def machine_cores() -> int:
    """The CPU cores this process may use (its affinity where the OS tells it, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class TaskOutcome:
    """The end of one task.

    Attributes:
        key: the task's artifact key (what failed, for the report).
        ok: whether it finished.
        value: its return value when ok, else None.
        error: the last exception's text when not ok.
        attempts: how many times it ran.
    """

    key: str
    ok: bool
    value: Any = None
    error: str = ""
    attempts: int = 1


class TaskFailedError(RuntimeError):
    """Raised by ``raise_failures`` with every failed key and its error."""


def raise_failures(outcomes: Sequence[TaskOutcome]) -> None:
    """Raise one TaskFailedError naming every failed task, if any failed."""
    failed = [o for o in outcomes if not o.ok]
    if failed:
        lines = "\n".join(f"  {o.key} (after {o.attempts} attempts): {o.error}" for o in failed)
        raise TaskFailedError(
            f"{len(failed)} of {len(outcomes)} tasks failed; finished ones are stored and a "
            f"re-run resumes from them:\n{lines}"
        )


def _short_error(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()


def _set_worker_threads(threads: int) -> None:
    torch.set_num_threads(threads)


@dataclass
class LocalExecutor:
    """Run tasks one after another in this process (the default).

    Attributes:
        max_retries: extra attempts for a task that raises.
        progress: show a progress bar with the remaining-time estimate.
    """

    max_retries: int = 1
    progress: bool = True

    def map(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str], desc: str = ""
    ) -> list[TaskOutcome]:
        """Apply ``fn`` to each task in turn, retrying a task that raises.

        Args:
            fn: a top-level (picklable) function applied to each task.
            tasks: the small picklable arguments, one per task.
            keys: the artifact key of each task, same length as ``tasks`` (names it in reports).
            desc: label of the progress bar.

        Returns:
            One outcome per task, in the order of ``tasks``.
        """
        outcomes = []
        for task, key in tqdm(
            list(zip(tasks, keys, strict=True)), desc=desc, disable=not self.progress
        ):
            for attempt in range(1, self.max_retries + 2):
                try:
                    outcomes.append(TaskOutcome(key, True, fn(task), attempts=attempt))
                    break
                except KeyboardInterrupt:
                    raise
                except Exception as error:  # reported by key, the run goes on
                    if attempt == self.max_retries + 1:
                        outcomes.append(TaskOutcome(key, False, None, _short_error(error), attempt))
        return outcomes


@dataclass
class PoolExecutor:
    """Run tasks in a local process pool (``concurrent.futures``, spawn start method).

    Attributes:
        workers: number of worker processes.
        threads_per_worker: torch intra-op threads in each worker.
        max_retries: extra attempts for a task that raises.
        progress: show a progress bar.
    """

    workers: int = 2
    threads_per_worker: int = 1
    max_retries: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    def map(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str], desc: str = ""
    ) -> list[TaskOutcome]:
        """Apply ``fn`` to each task in the process pool, resubmitting a task that raises.

        Args:
            fn: a top-level (picklable) function applied to each task.
            tasks: the small picklable arguments, one per task.
            keys: the artifact key of each task, same length as ``tasks`` (names it in reports).
            desc: label of the progress bar.

        Returns:
            One outcome per task, in the order of ``tasks``.
        """
        results: dict[int, TaskOutcome] = {}
        attempts = [0] * len(tasks)
        context = multiprocessing.get_context("spawn")
        with (
            futures.ProcessPoolExecutor(
                self.workers,
                mp_context=context,
                initializer=_set_worker_threads,
                initargs=(self.threads_per_worker,),
            ) as pool,
            tqdm(total=len(tasks), desc=desc, disable=not self.progress) as bar,
        ):
            pending = {}
            for index, task in enumerate(tasks):
                attempts[index] += 1
                pending[pool.submit(fn, task)] = index
            while pending:
                done, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    error = future.exception()
                    if error is None:
                        results[index] = TaskOutcome(
                            keys[index], True, future.result(), attempts=attempts[index]
                        )
                    elif attempts[index] <= self.max_retries:
                        attempts[index] += 1
                        pending[pool.submit(fn, tasks[index])] = index
                        continue
                    else:
                        results[index] = TaskOutcome(
                            keys[index], False, None, _short_error(error), attempts[index]
                        )
                    bar.update(1)
        return [results[i] for i in range(len(tasks))]


@dataclass
class RayExecutor:
    """Run tasks on a Ray cluster (``ray.init(address)``; None starts a local one).

    Tasks must read and write an artifact store on a path every worker can reach (a shared
    filesystem). GPUs are requested per task when the cluster has them.

    Attributes:
        address: Ray cluster address (``auto``, ``ray://host:10001``) or None for a local one.
        num_cpus: CPUs of a locally started cluster (None: all).
        cpus_per_task: CPUs each task reserves.
        gpus_per_task: GPUs each task reserves; None = 1 if the cluster has GPUs, else 0.
        max_retries: extra attempts for a task that raises or whose worker dies.
        progress: show a progress bar.
    """

    address: str | None = None
    num_cpus: int | None = None
    cpus_per_task: float = 1.0
    gpus_per_task: float | None = None
    max_retries: int = 1
    progress: bool = True

    def map(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str], desc: str = ""
    ) -> list[TaskOutcome]:
        """Apply ``fn`` to each task as a Ray remote task (Ray retries a task that raises).

        Args:
            fn: a top-level (picklable) function applied to each task.
            tasks: the small picklable arguments, one per task.
            keys: the artifact key of each task, same length as ``tasks`` (names it in reports).
            desc: label of the progress bar.

        Returns:
            One outcome per task, in the order of ``tasks``.
        """
        import ray  # deferred: optional extra [ray], only for --executor ray

        started_here = not ray.is_initialized()
        if started_here:
            ray.init(
                address=self.address,
                num_cpus=self.num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
            )
        try:
            gpus = self.gpus_per_task
            if gpus is None:
                gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            remote = ray.remote(fn).options(
                num_cpus=self.cpus_per_task,
                num_gpus=gpus,
                max_retries=self.max_retries,
                retry_exceptions=True,
            )
            refs = {remote.remote(task): index for index, task in enumerate(tasks)}
            results: dict[int, TaskOutcome] = {}
            with tqdm(total=len(tasks), desc=desc, disable=not self.progress) as bar:
                pending = list(refs)
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    index = refs[done[0]]
                    try:
                        results[index] = TaskOutcome(
                            keys[index], True, ray.get(done[0]), attempts=0
                        )
                    except Exception as error:  # RayTaskError wraps the task's exception
                        cause = getattr(error, "cause", None) or error
                        results[index] = TaskOutcome(
                            keys[index], False, None, _short_error(cause), self.max_retries + 1
                        )
                    bar.update(1)
            return [results[i] for i in range(len(tasks))]
        finally:
            if started_here:
                ray.shutdown()


@dataclass
class AutoExecutor:
    """Every core of this machine: a process pool when it has more than one, else in-process.

    Each ``map`` picks its executor for its tasks: a :class:`PoolExecutor` with
    ``min(workers, len(tasks))`` workers when that is more than one, else a
    :class:`LocalExecutor` (so a single task, or none, never pays for starting processes). The
    pool's results are bitwise those of in-process runs (one torch thread per worker; tested in
    ``tests/benchmarks/test_groundtruth.py``).

    Attributes:
        workers: the most worker processes; None = :func:`machine_cores`.
        max_retries: extra attempts for a task that raises.
        progress: show a progress bar.
    """

    workers: int | None = None
    max_retries: int = 1
    progress: bool = True

    def choose(self, n_tasks: int) -> LocalExecutor | PoolExecutor:
        """The executor ``map`` uses for ``n_tasks`` tasks."""
        workers = min(self.workers or machine_cores(), n_tasks)
        if workers > 1:
            return PoolExecutor(
                workers=workers, max_retries=self.max_retries, progress=self.progress
            )
        return LocalExecutor(max_retries=self.max_retries, progress=self.progress)

    def map(
        self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str], desc: str = ""
    ) -> list[TaskOutcome]:
        """Apply ``fn`` to each task with :meth:`choose`'s executor.

        Args:
            fn: a top-level (picklable) function applied to each task.
            tasks: the small picklable arguments, one per task.
            keys: the artifact key of each task, same length as ``tasks`` (names it in reports).
            desc: label of the progress bar.

        Returns:
            One outcome per task, in the order of ``tasks``.
        """
        return self.choose(len(tasks)).map(fn, tasks, keys, desc)


def make_executor(
    name: str,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    max_retries: int = 1,
    progress: bool = True,
) -> AutoExecutor | LocalExecutor | PoolExecutor | RayExecutor:
    """The executor called ``name`` (one of EXECUTOR_NAMES).

    Args:
        name: ``"auto"`` (a pool over every core when there are several, else in-process),
            ``"local"``, ``"pool"`` or ``"ray"``.
        workers: worker processes of the pool; CPUs of a locally started Ray cluster; None =
            every core of this machine (:func:`machine_cores`).
        ray_address: address of a running Ray cluster, or None to start a local one.
        max_retries: extra attempts for a task that raises.
        progress: show a progress bar.

    Returns:
        The configured executor.
    """
    if name == "auto":
        return AutoExecutor(workers=workers, max_retries=max_retries, progress=progress)
    if name == "local":
        return LocalExecutor(max_retries=max_retries, progress=progress)
    workers = workers or machine_cores()
    if name == "pool":
        return PoolExecutor(workers=workers, max_retries=max_retries, progress=progress)
    if name == "ray":
        return RayExecutor(
            address=ray_address,
            num_cpus=None if ray_address else workers,
            max_retries=max_retries,
            progress=progress,
        )
    raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTOR_NAMES)}")
