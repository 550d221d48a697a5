"""Shared fixtures of the attribution performance suite (``pytest perf --benchmark-only``).

What lives here:

- :class:`BenchProblem` (fixture ``bench_problem``): the ``quick`` preset's problem built once
  per session: the 357 ``digits2`` images, ``UNetConfig.tiny()`` briefly trained (so that every
  layer has non-zero output gradients and the K-FAC factors are non-degenerate: the U-Net's
  zero-initialised output layers would otherwise block them), 32 queries, 64 Monte Carlo samples
  for gradients, curvature and queries.
- :class:`RowBound` (fixture ``row_bound``): the "bound" every cost is compared with: one plain
  forward + backward of the model over a batch of (example, sample) rows, gradients of the summed
  loss only (no per-example gradient), at the fastest of a few batch sizes, re-measured next to
  each case so that ratios compare numbers taken under the same machine load.
- :class:`RatioRecorder` (fixture ``ratios``): records a ratio (or any derived number) into the
  case's ``benchmark.extra_info`` and into a session table printed at the end of the run
  (``pytest_terminal_summary``) and written to ``<--bench-out>/ratios.json`` with provenance
  (git commit, packages, machine: :func:`benchmarks.provenance.collect_provenance`).
- :func:`run_timed`: ``benchmark.pedantic`` plus our own wall-clock of every round, so that the
  seconds are known even under ``--benchmark-disable``.

Benchmarks never assert on timings: a missed target is flagged ``MISSED`` in the table only.
They may assert correctness (equal outputs, finite scores).

Threads: everything timed runs with ``torch.set_num_threads(1)`` (set in ``pytest_configure``
and again per test): on a shared 2-core machine OpenMP spin-waiting makes small-model work
10-100x slower with 2 threads.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from benchmarks.settings import Setting

REPO_DIR = Path(__file__).resolve().parents[1]
_ROWS_KEY = pytest.StashKey[list]()
_STORE_KEY = pytest.StashKey[dict]()
_START_KEY = pytest.StashKey[float]()

#: Run order of this suite's files (cases reuse results of earlier ones, e.g. the kronfluence
#: comparison and the methods' K-FAC reference reuse the K-FAC scores and time of the scoring
#: file). Other files run last.
_FILE_ORDER = (
    "test_bench_scoring.py",
    "test_bench_methods.py",
    "test_bench_kronfluence.py",
    "test_bench_memory.py",
)


# ---------------------------------------------------------------------------------------------
# pytest hooks
# ---------------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("attribution-bench", "attribution performance suite (perf/)")
    group.addoption(
        "--bench-out",
        default=str(REPO_DIR / "results" / "bench"),
        help="directory for ratios.json (default: results/bench)",
    )
    group.addoption(
        "--bench-train-steps",
        type=int,
        default=150,
        help="Adam steps of the briefly trained quick model (default 150; timing does not "
        "depend on training quality, only non-degenerate factors need some training)",
    )
    group.addoption(
        "--bench-fit-examples",
        type=int,
        default=96,
        help="training examples of the stand-alone K-FAC fit case (default 96 = 6 chunks; 0 = "
        "all 357). The full-size fit is also timed as a phase of the K-FAC score case",
    )
    group.addoption(
        "--bench-gt-steps",
        type=int,
        default=750,
        help="training steps of each model of the end-to-end ground-truth case (default 750 = "
        "the quick preset's subset recipe)",
    )
    group.addoption(
        "--bench-memory-samples",
        type=int,
        default=8,
        help="MC samples per example in the memory-scaling case (default 8)",
    )
    group.addoption(
        "--bench-attribute-samples",
        type=int,
        default=2,
        help="MC samples per image of the attribute 2k-vs-20k case (default 2)",
    )


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(1)
    config.stash[_ROWS_KEY] = []
    config.stash[_STORE_KEY] = {}
    config.stash[_START_KEY] = time.perf_counter()
    json_path = config.getoption("benchmark_json", default=None)
    if json_path:  # pytest-benchmark opens it without creating the directory
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _FILE_ORDER.index(name) if name in _FILE_ORDER else len(_FILE_ORDER)

    items.sort(key=rank)  # stable: the order inside a file is kept


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    rows: list[RatioRow] = config.stash.get(_ROWS_KEY, [])
    if not rows:
        return
    tr = terminalreporter
    tr.section("attribution performance: ratios measured in this run")
    width = max(len(r.name) for r in rows)
    tr.write_line(f"{'quantity'.ljust(width)}  {'value':>12}  {'target':>10}  status")
    for row in rows:
        tr.write_line(
            f"{row.name.ljust(width)}  {row.formatted():>12}  {row.target_text():>10}  "
            f"{row.status()}"
        )
    path = config.stash.get(_STORE_KEY, {}).get("_ratios_path")
    if path:
        tr.write_line(f"written to {path}")


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Rewrite ``ratios.json`` after every case: a run stopped part-way keeps its rows."""
    _write_ratios(item.config, exitstatus=None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _write_ratios(session.config, exitstatus=int(exitstatus))


def _write_ratios(config: pytest.Config, exitstatus: int | None) -> None:
    """Write the rows so far to ``<--bench-out>/ratios.json`` (nothing when there are none).

    Args:
        config: the pytest config (its stash holds the rows and the session store).
        exitstatus: the session's exit status; None while cases are still running (the file
            then says ``"finished": false``).
    """
    rows: list[RatioRow] = config.stash.get(_ROWS_KEY, [])
    if not rows:
        return
    from benchmarks.io import atomic_write_bytes, to_jsonable
    from benchmarks.provenance import collect_provenance

    store = config.stash[_STORE_KEY]
    if "_provenance" not in store:  # once per session: git and package look-ups
        store["_provenance"] = collect_provenance(REPO_DIR)
    out_dir = Path(config.getoption("--bench-out"))
    payload = {
        "suite": "perf (attribution scoring)",
        "finished": exitstatus is not None,
        "exitstatus": exitstatus,
        "suite_seconds": time.perf_counter() - config.stash[_START_KEY],
        "bound": store.get("_bound_summary"),
        "ratios": [row.to_dict() for row in rows],
        "provenance": store["_provenance"],
    }
    path = out_dir / "ratios.json"
    data = json.dumps(to_jsonable(payload, nonfinite="null"), indent=2) + "\n"
    atomic_write_bytes(path, data.encode())
    store["_ratios_path"] = str(path)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Every case runs with one intra-op thread (see the module docstring)."""
    torch.set_num_threads(1)
    yield


# ---------------------------------------------------------------------------------------------
# Ratios
# ---------------------------------------------------------------------------------------------


@dataclass
class RatioRow:
    """One line of the session's ratio table.

    Attributes:
        case: the test that measured it (node id).
        name: what it is, e.g. ``"kfac score / bound"``.
        value: the number.
        unit: ``"x"`` for ratios, else a unit (``"us/row"``, ``"MiB"``, ``""``).
        at_most: target upper bound, or None.
        at_least: target lower bound, or None.
        detail: how it was computed (numerator and denominator in seconds, rows, ...).
    """

    case: str
    name: str
    value: float
    unit: str = "x"
    at_most: float | None = None
    at_least: float | None = None
    detail: str = ""

    def meets(self) -> bool | None:
        if self.at_most is None and self.at_least is None:
            return None
        if not math.isfinite(self.value):
            return False
        ok = True
        if self.at_most is not None:
            ok = ok and self.value <= self.at_most
        if self.at_least is not None:
            ok = ok and self.value >= self.at_least
        return ok

    def formatted(self) -> str:
        if self.unit == "x":
            return f"{self.value:.3g}x"
        if not self.unit:  # correlations and other plain numbers
            return f"{self.value:.5f}"
        return f"{self.value:.4g} {self.unit}".strip()

    def target_text(self) -> str:
        if self.at_most is not None and self.at_least is not None:
            return f"[{self.at_least:g}, {self.at_most:g}]"
        if self.at_most is not None:
            return f"<= {self.at_most:g}"
        if self.at_least is not None:
            return f">= {self.at_least:g}"
        return ""

    def status(self) -> str:
        verdict = self.meets()
        return "" if verdict is None else ("met" if verdict else "MISSED")

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "at_most": self.at_most,
            "at_least": self.at_least,
            "meets_target": self.meets(),
            "detail": self.detail,
        }


class RatioRecorder:
    """Records derived numbers of one case (fixture ``ratios``)."""

    def __init__(self, rows: list[RatioRow], case: str) -> None:
        self._rows = rows
        self._case = case

    def record(
        self,
        benchmark: Any,
        name: str,
        value: float,
        *,
        unit: str = "x",
        at_most: float | None = None,
        at_least: float | None = None,
        detail: str = "",
    ) -> RatioRow:
        """Add ``name = value`` to ``benchmark.extra_info`` and to the session table.

        Never asserts: a missed target only shows as ``MISSED`` in the table.
        """
        row = RatioRow(
            case=self._case,
            name=name,
            value=float(value),
            unit=unit,
            at_most=at_most,
            at_least=at_least,
            detail=detail,
        )
        self._rows.append(row)
        if benchmark is not None:
            benchmark.extra_info[name] = row.value
            if detail:
                benchmark.extra_info[f"{name} [detail]"] = detail
        return row


@pytest.fixture
def ratios(request: pytest.FixtureRequest) -> RatioRecorder:
    return RatioRecorder(request.config.stash[_ROWS_KEY], request.node.nodeid)


@pytest.fixture(scope="session")
def bench_store(request: pytest.FixtureRequest) -> dict:
    """Session-wide results shared between cases (e.g. our K-FAC scores and seconds)."""
    return request.config.stash[_STORE_KEY]


def run_timed(
    benchmark: Any, fn: Callable[[], Any], *, rounds: int = 1, warmup_rounds: int = 0
) -> tuple[Any, float]:
    """Benchmark ``fn`` with ``benchmark.pedantic``; return ``(last result, fastest seconds)``.

    The seconds are our own ``perf_counter`` around each round (so they exist under
    ``--benchmark-disable`` too); warmup rounds are not counted.
    """
    seconds: list[float] = []
    calls = {"n": 0}

    def timed() -> Any:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        calls["n"] += 1
        if calls["n"] > warmup_rounds:
            seconds.append(elapsed)
        return result

    result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)
    if not seconds:  # pragma: no cover - pedantic always runs at least one round
        raise RuntimeError("benchmark.pedantic did not run the function")
    return result, min(seconds)


# ---------------------------------------------------------------------------------------------
# The problem
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchProblem:
    """The ``quick`` preset's attribution problem.

    Attributes:
        model: ``UNet(UNetConfig.tiny())`` briefly trained, eval mode, float32, CPU.
        schedule: its noise schedule (T = 1000).
        train_images: ``# [N, C, H, W]`` the training set (digits2: N = 357, 1 x 8 x 8).
        query_images: ``# [Q, C, H, W]`` the queries (Q = 32 training images, evenly spaced).
        grad_samples: MC samples per training example for training-loss gradients (64).
        fit_samples: MC samples per training example for the curvature (64).
        query_samples: MC samples per query for measurement gradients (64).
        batch_size: examples per gradient chunk (``KFACInfluence.Config.batch_size``).
        seed: seed of the MC draws.
        proj_dim: TRAK's projection dimension in this preset (4096).
        setting: the quick preset with the bench's training recipe (``--bench-train-steps``
            steps): the U-Net, recipe, seed and schedule :attr:`model` was trained with
            (``benchmarks.pipeline.train_base_model``), for cases that retrain (checkpoints,
            ensemble members); its ``method_options`` are what a quick run builds methods with.
        measurement: the measurement attributed (``"loss"``).
    """

    model: torch.nn.Module
    schedule: Any
    train_images: torch.Tensor
    query_images: torch.Tensor
    grad_samples: int
    fit_samples: int
    query_samples: int
    batch_size: int
    seed: int
    proj_dim: int
    setting: Setting | None = None
    measurement: str = "loss"

    @property
    def n_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def n_queries(self) -> int:
        return int(self.query_images.shape[0])

    def context(self, train_images: torch.Tensor | None = None, **overrides: Any):
        """A :class:`methods.context.MethodContext` of this problem (no cache, no progress)."""
        from methods.context import MethodContext

        kwargs: dict[str, Any] = {
            "model": self.model,
            "schedule": self.schedule,
            "train_images": self.train_images if train_images is None else train_images,
            "query_images": self.query_images,
            "measurement": self.measurement,
            "seed": self.seed,
            "grad_samples": self.grad_samples,
            "fit_samples": self.fit_samples,
            "query_samples": self.query_samples,
        }
        kwargs.update(overrides)
        return MethodContext(**kwargs)


def build_problem(train_steps: int) -> BenchProblem:
    """The quick preset's problem (see :class:`BenchProblem`); seconds on the CPU."""
    from benchmarks.pipeline import train_base_model
    from benchmarks.settings import get_preset
    from datasets import load_dataset
    from diffusion.train import TrainConfig
    from methods.kfac import KFACInfluence

    quick = get_preset("quick")
    images = load_dataset(quick.dataset).images
    if quick.n_train is not None:
        images = images[: quick.n_train]
    recipe = TrainConfig(
        steps=train_steps,
        batch_size=quick.train.batch_size,
        lr=2e-3,
        lr_schedule="cosine",
        warmup_steps=min(10, train_steps),
        grad_clip=1.0,
    )
    setting = quick.replace(train=recipe)
    model = train_base_model(setting, images, device=torch.device("cpu"), progress=False).eval()
    positions = torch.linspace(0, images.shape[0] - 1, setting.n_queries).round().long()
    options = dict(setting.method_options)
    return BenchProblem(
        model=model,
        schedule=setting.schedule,
        train_images=images,
        query_images=images[positions].clone(),
        grad_samples=setting.grad_mc_samples,
        fit_samples=setting.kfac_mc_samples,
        query_samples=setting.query_grad_mc_samples,
        batch_size=KFACInfluence.Config().batch_size,
        seed=setting.seed,
        proj_dim=int(options.get("proj_dim", 4096)),
        setting=setting,
    )


@pytest.fixture(scope="session")
def bench_problem(request: pytest.FixtureRequest) -> BenchProblem:
    torch.set_num_threads(1)
    return build_problem(int(request.config.getoption("--bench-train-steps")))


# ---------------------------------------------------------------------------------------------
# The bound: one plain forward + backward per row
# ---------------------------------------------------------------------------------------------


class RowBound:
    """Seconds per (example, sample) row of one plain forward + backward of the model.

    The loss is the diffusion loss of each row (pixel-mean squared error) summed over the batch;
    ``backward`` forms the summed parameter gradients only (no per-example gradients). Inputs
    are prepared outside the timed region. The batch size is swept once (:attr:`sweep`), the
    fastest per-row cost picks :attr:`batch_size`, and :meth:`per_row` re-measures at that batch
    size (the bound next to a case, under the same load).

    Args:
        problem: the model and images.
        batch_sizes: batch sizes swept.
        min_rows: rows per measurement (several batches for small batch sizes).
    """

    def __init__(
        self,
        problem: BenchProblem,
        batch_sizes: tuple[int, ...] = (64, 256, 1024, 2048),
        min_rows: int = 1024,
    ) -> None:
        self.problem = problem
        self.min_rows = min_rows
        self.sweep: dict[int, float] = {}
        for size in batch_sizes:
            self.sweep[size] = self._measure(size, repeats=2)
        self.batch_size = min(self.sweep, key=self.sweep.__getitem__)

    def _inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(size)
        images = self.problem.train_images
        pick = torch.randint(0, images.shape[0], (size,), generator=gen)
        t = torch.randint(0, self.problem.schedule.num_timesteps, (size,), generator=gen)
        eps = torch.randn((size, *images.shape[1:]), generator=gen)
        x_t = self.problem.schedule.q_sample(images[pick], t, eps)
        return x_t, t, eps

    def _measure(self, size: int, repeats: int) -> float:
        model = self.problem.model
        x_t, t, eps = self._inputs(size)
        n_batches = max(1, math.ceil(self.min_rows / size))
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        best = math.inf
        try:
            for p in params:
                p.requires_grad_(True)
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(n_batches):
                    model.zero_grad(set_to_none=True)
                    loss = (eps - model(x_t, t)).square().mean(dim=(1, 2, 3)).sum()
                    loss.backward()
                best = min(best, (time.perf_counter() - start) / (n_batches * size))
        finally:
            model.zero_grad(set_to_none=True)
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
        return best

    def per_row(self, repeats: int = 2) -> float:
        """Seconds per row now, at the fastest batch size (min over ``repeats``)."""
        return self._measure(self.batch_size, repeats)

    def around(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """``(fn(), per-row bound)`` with the bound the mean of measurements before and after."""
        before = self.per_row()
        result = fn()
        after = self.per_row()
        return result, 0.5 * (before + after)

    def summary(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "sweep_us_per_row": {str(k): v * 1e6 for k, v in self.sweep.items()},
        }


@pytest.fixture(scope="session")
def row_bound(bench_problem: BenchProblem, bench_store: dict) -> RowBound:
    torch.set_num_threads(1)
    bound = RowBound(bench_problem)
    bench_store["_bound_summary"] = bound.summary()
    return bound


@dataclass
class Phases:
    """Wall seconds of named phases inside one timed call (see :func:`timed_function`)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + value


def timed_function(fn: Callable[..., Any], phases: Phases, name: str) -> Callable[..., Any]:
    """Wrap a function so that its wall time is added to ``phases[name]``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases.add(name, time.perf_counter() - start)

    return wrapper


def timed_generator(
    fn: Callable[..., Iterator[Any]], phases: Phases, name: Callable[..., str]
) -> Callable[..., Iterator[Any]]:
    """Wrap a generator function: the time spent producing its items goes to ``phases``.

    ``name(*args, **kwargs)`` names the phase of one call (e.g. from its ``desc``).
    """

    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        label = name(*args, **kwargs)
        iterator = fn(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                phases.add(label, time.perf_counter() - start)
                return
            phases.add(label, time.perf_counter() - start)
            yield item

    return wrapper
