"""Our K-FAC influence against kronfluence's on the same model and the same Monte Carlo draws.

kronfluence (benchmark-only dependency, imported inside the test) computes the same quantity as
``KFACInfluence`` with its defaults (GGN^model by the MC-Fisher, K-FAC expand, damping 1e-8):

- Training loss (``compute_train_loss``): each example of a batch is expanded to its 64 (t, eps)
  draws *inside the task*, drawn exactly as ours draw them
  (:func:`methods.gradients.draw_examples` with our seed and streams: ``"fit"`` with the
  MC-Fisher's target noise for the factors, ``"train"`` for the gradients); the loss is the sum
  over rows of the pixel-mean squared error.
- MC-Fisher (``sample=True``): the pseudo-loss ``sum_rows <v, eps_theta(x_t)>`` with
  ``v = sqrt(2 / d) z`` (``z`` our target noise, ``d`` pixels), whose output gradient has
  covariance ``(2/d) I``: the output Hessian of the pixel-mean squared error, as curvlinops'
  ``MSELoss(reduction="mean")`` MC-Fisher gives ours.
- Per-example gradients: kronfluence's layers see the ``B * 64`` rows; the task's
  ``post_process_per_sample_gradient`` averages each example's 64 rows (the MC mean), so query
  and training gradients are per example, as ours.
- Factor normalisation: kronfluence divides both Kronecker factors by the number of rows times
  the positions of a weight-sharing layer (conv pixels, attention tokens); curvlinops' K-FAC
  expand divides the output-gradient factor by the rows only. The benchmark patches
  kronfluence's gradient count to the rows (``_rows_count``), otherwise each layer's block
  would be ``positions`` times smaller and the layers weighted differently.
- Precision: factors accumulated in float64 (``activation/gradient_covariance_dtype``), as ours.

Scores: kronfluence's ``g_q^T (H + lambda I)^-1 g_j``; ours divide by N (the removal of one of N
examples): compared after scaling by N, sign as is (both: positive = removing ``j`` increases
the query's loss). Time: kronfluence's factors (covariance + eigendecomposition) plus pairwise
scores against our whole ``KFACInfluence.score`` measured in test_bench_scoring.py in the same
run.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from conftest import BenchProblem, RowBound, run_timed
from scipy.stats import pearsonr, spearmanr

from methods.gradients import draw_examples

# kronfluence 1.0 builds a (disabled) CUDA GradScaler on the CPU too
pytestmark = pytest.mark.filterwarnings("ignore:`torch.cuda.amp.GradScaler:FutureWarning")

FIT_STREAM = "fit"
TRAIN_STREAM = "train"
QUERY_STREAM = "query"


def _streams() -> tuple[str, str, str]:
    """Our draw streams (from the method modules when they name them)."""
    import methods.kfac as kfac_module
    import methods.kfac_curvature as curvature_module

    return (
        getattr(curvature_module, "FIT_STREAM", FIT_STREAM),
        getattr(kfac_module, "TRAIN_STREAM", TRAIN_STREAM),
        getattr(kfac_module, "QUERY_STREAM", QUERY_STREAM),
    )


def _make_task(problem: BenchProblem):
    """A kronfluence Task computing our MC diffusion loss and measurement."""
    from kronfluence.task import Task

    fit_stream, train_stream, query_stream = _streams()
    shape = tuple(problem.train_images.shape[1:])
    pixels = math.prod(shape)
    num_t = problem.schedule.num_timesteps
    schedule = problem.schedule

    class DiffusionTask(Task):
        enable_post_process_per_sample_gradient = True

        def __init__(self) -> None:
            self.samples = problem.grad_samples

        def _rows(self, batch, n_samples: int, stream: str, extra_noise: bool):
            images, index = batch
            draws = draw_examples(
                index,
                n_samples,
                shape,
                num_t,
                seed=problem.seed,
                stream=stream,
                extra_noise=extra_noise,
            )
            n_items = images.shape[0]
            rows = n_items * n_samples
            x0 = images.unsqueeze(1).expand(n_items, n_samples, *shape).reshape(rows, *shape)
            t = draws.t.reshape(rows)
            eps = draws.eps.reshape(rows, *shape)
            return schedule.q_sample(x0, t, eps), t, eps, draws.extra_noise

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            if sample:  # MC-Fisher pseudo-loss, the draws of our curvature fit
                self.samples = problem.fit_samples
                x_t, t, _, noise = self._rows(batch, self.samples, fit_stream, True)
                out = model(x_t, t)
                v = math.sqrt(2.0 / pixels) * noise.reshape(out.shape)
                return (out * v).sum()
            self.samples = problem.grad_samples
            x_t, t, eps, _ = self._rows(batch, self.samples, train_stream, False)
            return (eps - model(x_t, t)).square().mean(dim=(1, 2, 3)).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            self.samples = problem.query_samples
            x_t, t, eps, _ = self._rows(batch, self.samples, query_stream, False)
            return (eps - model(x_t, t)).square().mean(dim=(1, 2, 3)).sum()

        def post_process_per_sample_gradient(self, module_name, gradient):
            # [B * S, d_out, d_in] per row -> [B, d_out, d_in], the MC mean of each example
            return gradient.reshape(-1, self.samples, *gradient.shape[1:]).mean(dim=1)

    return DiffusionTask()


def _rows_count(original):
    """kronfluence's get_flattened_gradient, counting rows instead of rows x positions."""

    def get_flattened_gradient(self, output_gradient):
        flat, _ = original(self, output_gradient)
        return flat, output_gradient.shape[0]

    return get_flattened_gradient


class _Indexed(torch.utils.data.Dataset):
    """``(image, index)`` pairs: the task draws the MC samples of example ``index``."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int):
        return self.images[i], i


def _our_scores(problem: BenchProblem, store: dict) -> tuple[np.ndarray, float | None]:
    if "kfac_scores" not in store:  # the scoring file did not run: compute (untimed)
        from methods.kfac import KFACInfluence

        store["kfac_scores"] = KFACInfluence().score(problem.context())
    return store["kfac_scores"], store.get("kfac_seconds")


def test_kronfluence_kfac(
    benchmark, bench_problem, row_bound: RowBound, ratios, bench_store, tmp_path, monkeypatch
):
    """kronfluence K-FAC factors + pairwise scores, same model, draws and damping as ours."""
    kronfluence = pytest.importorskip("kronfluence")
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.module.conv2d import TrackedConv2d
    from kronfluence.module.linear import TrackedLinear

    from methods.kfac import KFACInfluence

    p = bench_problem
    damping = KFACInfluence.Config().damping
    for cls in (TrackedConv2d, TrackedLinear):
        monkeypatch.setattr(cls, "get_flattened_gradient", _rows_count(cls.get_flattened_gradient))
    task = _make_task(p)
    model = prepare_model(copy.deepcopy(p.model).eval(), task)
    analyzer = Analyzer(
        analysis_name="bench",
        model=model,
        task=task,
        cpu=True,
        log_level=logging.WARNING,
        disable_tqdm=True,
        output_dir=str(tmp_path),
    )
    factor_args = FactorArguments(
        strategy="kfac",
        activation_covariance_dtype=torch.float64,
        gradient_covariance_dtype=torch.float64,
    )
    score_args = ScoreArguments(damping_factor=damping)
    train_set, query_set = _Indexed(p.train_images), _Indexed(p.query_images)

    def run() -> torch.Tensor:
        analyzer.fit_all_factors(
            factors_name="kfac",
            dataset=train_set,
            per_device_batch_size=p.batch_size,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="kfac",
            query_dataset=query_set,
            train_dataset=train_set,
            per_device_query_batch_size=p.batch_size,
            per_device_train_batch_size=p.batch_size,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("pairwise")["all_modules"]

    (theirs, seconds), bound = row_bound.around(lambda: run_timed(benchmark, run, rounds=1))
    theirs = theirs.to(torch.float64).numpy()
    assert theirs.shape == (p.n_queries, p.n_train) and np.isfinite(theirs).all()

    ours, our_seconds = _our_scores(p, bench_store)
    ours_scaled = ours * p.n_train  # ours are per removal of one of N examples
    rho = float(spearmanr(ours_scaled.ravel(), theirs.ravel()).statistic)
    per_query = [float(spearmanr(ours_scaled[q], theirs[q]).statistic) for q in range(p.n_queries)]
    pearson = float(pearsonr(ours_scaled.ravel(), theirs.ravel()).statistic)
    rel = float(np.linalg.norm(ours_scaled - theirs) / np.linalg.norm(theirs))

    rows = p.n_train * (p.fit_samples + p.grad_samples) + p.n_queries * p.query_samples
    benchmark.extra_info["kronfluence version"] = getattr(kronfluence, "__version__", "?")
    ratios.record(benchmark, "kronfluence kfac score", seconds, unit="s")
    ratios.record(
        benchmark,
        "kronfluence kfac score / bound",
        seconds / (rows * bound),
        detail=f"{seconds:.1f} s vs {rows} rows x {bound * 1e6:.0f} us",
    )
    if our_seconds is not None:
        ratios.record(
            benchmark,
            "ours / kronfluence (kfac score time)",
            our_seconds / seconds,
            at_most=1.0,
            detail=f"{our_seconds:.1f} s vs {seconds:.1f} s",
        )
    ratios.record(
        benchmark,
        "spearman(ours, kronfluence) all pairs",
        rho,
        unit="",
        at_least=0.95,
        detail=f"per-query median {np.median(per_query):.4f}, min {min(per_query):.4f}; "
        f"pearson {pearson:.4f}; relative L2 difference {rel:.3g}",
    )
    ratios.record(
        benchmark,
        "spearman(ours, kronfluence) per-query median",
        float(np.median(per_query)),
        unit="",
        at_least=0.95,
    )
    # Same estimator, same draws: anything but a near-perfect agreement is a bug in one of them.
    assert rho > 0.9, f"kronfluence and our K-FAC influence disagree: Spearman {rho:.3f}"
