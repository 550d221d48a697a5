"""Peak memory of K-FAC scoring as the training set doubles, at a fixed chunk size.

``KFACInfluence.score`` runs in a fresh subprocess for N = 357 (the quick training set) and
N = 714 (the set duplicated), with the same chunk size (``batch_size`` examples per gradient
chunk); the peak RSS growth during the call (:class:`benchmarks.provenance.StageTimer`) should
not grow with N (target: ratio ~1): scores are ``# [Q, N]`` and everything else is per chunk.
Fresh processes, so that the allocator state left by other cases does not hide or inflate a
growth. MC samples are reduced (``--bench-memory-samples``, default 8) to keep the two runs
short: that shrinks the per-chunk activations and so makes any N-dependent allocation (e.g.
storing all training gradients) stand out more, not less.

Run as a script (``python perf/test_bench_memory.py --child ...``) it is the subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parents[1]


def _child(payload_path: str, copies: int, samples: int) -> dict:
    """Score with the training set repeated ``copies`` times; peak memory and seconds."""
    torch.set_num_threads(1)
    from benchmarks.provenance import StageTimer
    from methods.context import MethodContext
    from methods.kfac import KFACInfluence

    payload = torch.load(payload_path, weights_only=False)
    train = torch.cat([payload["train"]] * copies)  # [copies * N, C, H, W]
    ctx = MethodContext(
        model=payload["model"],
        schedule=payload["schedule"],
        train_images=train,
        query_images=payload["queries"],
        seed=payload["seed"],
        grad_samples=samples,
        fit_samples=samples,
        query_samples=samples,
    )
    method = KFACInfluence(KFACInfluence.Config(batch_size=payload["batch_size"]))
    with StageTimer("score", device="cpu", sample_interval_s=0.005) as timer:
        scores = method.score(ctx)
    return {
        "n_train": int(train.shape[0]),
        "seconds": timer.seconds,
        "peak_memory_mb": timer.peak_memory_mb,
        "peak_rss_mb": timer.peak_rss_mb,
        "finite": bool(torch.isfinite(torch.as_tensor(scores)).all()),
        "shape": list(scores.shape),
    }


def _run_child(payload: Path, copies: int, samples: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(payload), str(copies), str(samples)],
        cwd=REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe (copies={copies}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kfac_score_memory_scaling(benchmark, bench_problem, ratios, tmp_path, request):
    """Peak RSS growth of KFACInfluence.score at N and 2N (fresh processes, same chunk size)."""
    from conftest import run_timed

    p = bench_problem
    samples = int(request.config.getoption("--bench-memory-samples"))
    payload = tmp_path / "problem.pt"
    torch.save(
        {
            "model": p.model,
            "schedule": p.schedule,
            "train": p.train_images,
            "queries": p.query_images,
            "seed": p.seed,
            "batch_size": p.batch_size,
        },
        payload,
    )

    def both() -> tuple[dict, dict]:
        return _run_child(payload, 1, samples), _run_child(payload, 2, samples)

    (small, large), _ = run_timed(benchmark, both, rounds=1)
    for run in (small, large):
        assert run["finite"] and run["shape"] == [p.n_queries, run["n_train"]]
    growth = large["peak_memory_mb"] / max(small["peak_memory_mb"], 1e-9)
    benchmark.extra_info["runs"] = [small, large]
    for run in (small, large):
        ratios.record(
            benchmark,
            f"kfac score peak RSS growth, N={run['n_train']}",
            run["peak_memory_mb"],
            unit="MiB",
            detail=f"{samples} MC samples, chunk {p.batch_size}; {run['seconds']:.1f} s; "
            f"absolute peak {run['peak_rss_mb']:.0f} MiB",
        )
    ratios.record(
        benchmark,
        "kfac score peak memory growth 2N / N",
        growth,
        at_most=1.25,
        detail=f"{large['peak_memory_mb']:.1f} vs {small['peak_memory_mb']:.1f} MiB",
    )
    ratios.record(
        benchmark,
        "kfac score time 2N / N",
        large["seconds"] / small["seconds"],
        detail="linear scaling = 2",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="memory probe subprocess (internal)")
    parser.add_argument("--child", nargs=3, metavar=("PAYLOAD", "COPIES", "SAMPLES"), required=True)
    args = parser.parse_args()
    path, copies, samples = args.child
    print(json.dumps(_child(path, int(copies), int(samples))))
