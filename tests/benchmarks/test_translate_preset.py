"""The ``translate`` preset (issue 16): quick on ``digits2-translated``, end to end at tiny size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import lds
from benchmarks.errors import UsageError
from benchmarks.settings import get_preset
from datasets import load_dataset
from diffusion.unet import UNet, UNetConfig, count_parameters
from tests.benchmarks.tiny import TINY_OVERRIDES

# The tiny sizes, with a smaller U-Net and 50 noise levels (sampling the queries walks all of
# them) for seconds on one thread: 16x16 images cost four times the smoke preset's 8x8.
TINY_TRANSLATE = {**TINY_OVERRIDES, "unet": {"base_channels": 8}, "schedule": {"num_timesteps": 50}}


def test_translate_is_quick_on_the_translated_digits():
    translate, quick = get_preset("translate"), get_preset("quick")
    assert translate.dataset == "digits2-translated" and translate.n_train is None
    assert translate.unet == UNetConfig(
        image_channels=1,
        image_size=16,
        base_channels=8,
        channel_mults=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_groups=4,
    )
    assert count_parameters(UNet(translate.unet)) == 71_033  # about quick's 72,113
    # Subset models train with the full recipe, with seeds shared across subsets (the noise
    # ceiling: README, "The translate preset"), 4 per subset.
    assert translate.train == quick.train and translate.subset_train == quick.train
    assert (translate.train.steps, translate.train.batch_size) == (1500, 64)
    assert (translate.subset_seeds, quick.subset_seeds) == ("shared", "independent")
    assert (translate.n_subsets, translate.n_seeds, translate.n_queries) == (32, 4, 32)
    assert translate.gt_mc_samples == 256
    samples = ("grad_mc_samples", "kfac_mc_samples", "query_grad_mc_samples")
    assert [getattr(translate, f) for f in samples] == [getattr(quick, f) for f in samples]
    assert translate.n_retrain_queries == quick.n_retrain_queries
    assert translate.seed == quick.seed and translate.method_options == quick.method_options


def test_translate_rejects_an_8x8_unet():
    with pytest.raises(UsageError, match="'digits2-translated' images are 1x16x16"):
        get_preset("translate").replace(unet=UNetConfig.tiny())


def test_tiny_translate_lds_runs_end_to_end(tmp_path):
    config = lds.LDSConfig(
        methods=("kfac", "pixel"),
        preset="translate",
        overrides=TINY_TRANSLATE,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "out"),
        progress=False,
        threads=1,
    )
    result = lds.run(config)
    rows = result.summary.set_index("method")
    assert list(rows.loc[["kfac", "pixel"], "status"]) == ["ok", "ok"]
    assert np.isfinite(rows.loc[["kfac", "pixel"], "lds_mean"].to_numpy(dtype=float)).all()
    assert set(rows["preset"]) == {"translate"} and result.files["summary"].exists()
    # The run trained on the first 24 translated digits and drew 16x16 queries.
    prepared = lds.prepare(config)  # everything is cached now: nothing is retrained
    expected = load_dataset("digits2-translated").images[:24]
    assert torch.equal(prepared.experiment.train_images, expected)
    assert tuple(prepared.experiment.queries.images.shape) == (2, 1, 16, 16)
