"""CLIP cosine baseline: a tiny open_clip model through the real loading path, and the
unavailable path (no local weights: never random weights, never a download)."""

from __future__ import annotations

import math

import numpy as np
import open_clip
import pytest
import torch
from open_clip.factory import _MODEL_CONFIGS

from diffusion.schedule import NoiseSchedule
from methods import MethodContext, MethodUnavailableError, create_method
from methods.clip import CLIPConfig, CLIPCosine, preprocess_images

TINY_NAME = "tiny-test-clip"
TINY_CFG = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture
def tiny_checkpoint(tmp_path, monkeypatch):
    """Register the tiny architecture and save random weights to a checkpoint file."""
    monkeypatch.setitem(_MODEL_CONFIGS, TINY_NAME, TINY_CFG)
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CFG)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def make_ctx(train, queries) -> MethodContext:
    return MethodContext(
        model=torch.nn.Identity(),
        schedule=NoiseSchedule(num_timesteps=10),
        train_images=train,
        query_images=queries,
    )


def assert_explicit_cosines(scores, images, n_train, state_dict, mean=MEAN, std=STD):
    """Reference: the weights in a fresh float64 model, one image at a time, explicit cosines."""
    ref = open_clip.CLIP(**TINY_CFG).double().eval()
    ref.load_state_dict(state_dict)
    mean = torch.tensor(mean, dtype=torch.float64).reshape(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float64).reshape(3, 1, 1)
    with torch.no_grad():
        emb = [
            ref.encode_image((((img.double() + 1) / 2 - mean) / std)[None])[0].tolist()
            for img in images
        ]
    for q in range(images.shape[0] - n_train):
        for j in range(n_train):
            a, b = emb[n_train + q], emb[j]
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            cos = dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
            assert scores[q, j] == pytest.approx(cos, abs=1e-5)


def test_tiny_clip_scores_equal_explicit_cosines_of_checkpoint_embeddings(tiny_checkpoint):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(7, 3, 16, 16, generator=gen) * 2 - 1  # model input size: no resize
    ctx = make_ctx(images[:5], images[5:])
    method = create_method("clip", model_name=TINY_NAME, checkpoint_path=str(tiny_checkpoint))
    assert method.availability() == (True, "")
    scores = method.score(ctx)
    assert scores.shape == (2, 5) and scores.dtype == np.float64

    assert_explicit_cosines(scores, images, 5, torch.load(tiny_checkpoint, weights_only=True))
    assert np.argmax(method.score(make_ctx(images[:5], images[:5])), axis=1).tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_pretrained_tag_is_read_from_the_hf_cache_offline(tiny_checkpoint, tmp_path, monkeypatch):
    """A tag whose weights sit in a Hugging Face cache is found without network access and
    loaded with the tag's mean/std."""
    from open_clip import pretrained
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    cfg = pretrained._pcfg(hf_hub="org/tiny-clip/", mean=mean, std=std)
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_NAME, {"cachedtag": cfg})
    repo = tmp_path / "hf" / "models--org--tiny-clip"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    state = torch.load(tiny_checkpoint, weights_only=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        repo / "snapshots" / "abc123" / "open_clip_model.safetensors",
    )
    method = create_method(
        "clip", model_name=TINY_NAME, pretrained="cachedtag", cache_dir=str(tmp_path / "hf")
    )
    assert method.availability() == (True, "")
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(5, 3, 16, 16, generator=gen) * 2 - 1
    scores = method.score(make_ctx(images[:3], images[3:]))
    assert_explicit_cosines(scores, images, 3, state, mean=mean, std=std)


def test_scores_do_not_depend_on_batch_size_and_grayscale_is_resized(tiny_checkpoint):
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1
    ctx = make_ctx(images[:4], images[4:])
    cfg = dict(model_name=TINY_NAME, checkpoint_path=str(tiny_checkpoint))
    a = CLIPCosine(CLIPConfig(batch_size=1, **cfg)).score(ctx)
    b = CLIPCosine(CLIPConfig(batch_size=7, **cfg)).score(ctx)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_preprocess_constant_image_closed_form():
    value = 0.25  # [-1, 1] -> 0.625 in [0, 1]; bicubic resizing keeps a constant image
    images = torch.full((2, 1, 8, 8), value)
    out = preprocess_images(images, 16, MEAN, STD)
    assert out.shape == (2, 3, 16, 16)
    for c in range(3):
        expected = (0.625 - MEAN[c]) / STD[c]
        torch.testing.assert_close(out[:, c], torch.full((2, 16, 16), expected))
    with pytest.raises(ValueError, match="1 or 3"):
        preprocess_images(torch.zeros(1, 2, 8, 8), 16, MEAN, STD)


def test_unavailable_without_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    method = create_method("clip", cache_dir=str(tmp_path))  # empty cache, default ViT-B-32
    available, reason = method.availability()
    assert not available
    assert "not in the local cache" in reason and "checkpoint_path" in reason
    ctx = make_ctx(torch.zeros(2, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(MethodUnavailableError, match="never downloads"):
        method.score(ctx)
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or created

    missing = create_method("clip", checkpoint_path=str(tmp_path / "nope.pt"))
    assert missing.availability() == (
        False,
        f"CLIP checkpoint_path {str(tmp_path / 'nope.pt')!r} is not a file",
    )
    with pytest.raises(MethodUnavailableError, match="not a file"):
        missing.score(ctx)
    assert not create_method("clip", model_name="no-such-model").availability()[0]


def test_config_validation():
    for bad in (
        {"model_name": ""},
        {"batch_size": 0},
        {"pretrained": None, "checkpoint_path": None},
        {"checkpoint_path": ""},
    ):
        with pytest.raises(ValueError):
            CLIPConfig(**bad)
