"""CLIP cosine similarity: the embedding-similarity baseline of the paper (App. G.3).

``scores[q, j] = cos(CLIP(x_q), CLIP(x_j))``: higher similarity counts as more influential, i.e.
a positive score is read as "removing j raises the query's measurement". This is the paper's
heuristic (after Park et al. 2023): it ignores the diffusion model and the measurement, and its
scale means nothing (LDS only uses rankings).

Weights are never downloaded. They come from ``checkpoint_path`` (a local file) or from an
open_clip ``pretrained`` tag already in the local cache: the Hugging Face hub cache (looked up
with ``huggingface_hub.try_to_load_from_cache``, which never goes online) or open_clip's URL
cache (``~/.cache/clip``). When neither holds them the method is unavailable, with the reason,
and ``score`` raises :class:`MethodUnavailableError`: it never scores with random weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import AttributionMethod, MethodUnavailableError
from methods.baselines import cosine_similarity_matrix

if TYPE_CHECKING:
    from methods.context import MethodContext

__all__ = ["CLIPConfig", "CLIPCosine", "ResolvedWeights", "preprocess_images", "resolve_weights"]

_URL_CACHE = "~/.cache/clip"  # open_clip's default for URL downloads


@dataclass(frozen=True)
class CLIPConfig:
    """Options of the CLIP cosine baseline.

    Attributes:
        model_name: open_clip architecture name (``open_clip.list_models()``), default
            ``"ViT-B-32"``.
        pretrained: open_clip pretrained tag (``open_clip.list_pretrained_tags_by_model``),
            default ``"openai"``; used only if its weights are already in the local cache.
            None: only ``checkpoint_path``.
        checkpoint_path: a local weights file (open_clip state dict, ``.pt``/``.bin``/
            ``.safetensors``) for ``model_name``; takes precedence over ``pretrained``. Loaded
            with open_clip's default (OpenAI) mean/std and the architecture as named: OpenAI's
            ViT-B-32 weights need ``model_name="ViT-B-32-quickgelu"``.
        cache_dir: where open_clip / the Hugging Face hub cache their downloads (their
            ``cache_dir``); None: the defaults (``HF_HUB_CACHE`` and ``~/.cache/clip``).
        batch_size: images per forward pass (memory knob; scores do not depend on it).
    """

    model_name: str = "ViT-B-32"
    pretrained: str | None = "openai"
    checkpoint_path: str | None = None
    cache_dir: str | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty str, got {self.model_name!r}")
        for name in ("pretrained", "checkpoint_path", "cache_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be None or a non-empty str, got {value!r}")
        if self.pretrained is None and self.checkpoint_path is None:
            raise ValueError(
                "set pretrained (a tag) or checkpoint_path (a file): CLIP needs weights"
            )
        if (
            not isinstance(self.batch_size, int)
            or isinstance(self.batch_size, bool)
            or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")


@dataclass(frozen=True)
class ResolvedWeights:
    """Where the weights are, or why they cannot be had.

    Attributes:
        path: local weights file, or None when unavailable.
        reason: why ``path`` is None ("" otherwise).
        pretrained_cfg: open_clip's pretrained config of the tag (mean, std, quick_gelu), or
            ``{}`` for a plain checkpoint file.
    """

    path: str | None
    reason: str
    pretrained_cfg: dict[str, Any]


def _hf_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """open_clip's ``hf_hub`` entry ``org/repo/[filename]`` -> (repo id, file names to try)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME  # deferred: heavy

    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    names = []
    if filename == HF_WEIGHTS_NAME:
        names.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    names.append(filename)
    return repo_id, names


def resolve_weights(config: CLIPConfig) -> ResolvedWeights:
    """Find the weights locally, without any network access.

    Order: ``checkpoint_path``; the tag's ``file``; the Hugging Face cache (safetensors first,
    as open_clip does); open_clip's URL cache.
    """
    import open_clip  # deferred: heavy; --method kfac never imports CLIP

    if config.model_name not in open_clip.list_models():
        return ResolvedWeights(
            None,
            f"unknown open_clip model {config.model_name!r}; see open_clip.list_models()",
            {},
        )
    if config.checkpoint_path is not None:
        if os.path.isfile(config.checkpoint_path):
            return ResolvedWeights(config.checkpoint_path, "", {})
        return ResolvedWeights(
            None, f"CLIP checkpoint_path {config.checkpoint_path!r} is not a file", {}
        )
    tag = config.pretrained
    pcfg = dict(open_clip.get_pretrained_cfg(config.model_name, tag))
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(config.model_name)
        return ResolvedWeights(
            None,
            f"open_clip has no pretrained tag {tag!r} for {config.model_name}; tags: {tags}",
            {},
        )
    if pcfg.get("file") and os.path.isfile(pcfg["file"]):
        return ResolvedWeights(pcfg["file"], "", pcfg)
    looked: list[str] = []
    if pcfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache  # deferred: with open_clip

        repo_id, names = _hf_candidates(pcfg["hf_hub"])
        for name in names:
            found = try_to_load_from_cache(repo_id, name, cache_dir=config.cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return ResolvedWeights(found, "", pcfg)
            looked.append(f"hf-hub {repo_id}/{name}")
    if pcfg.get("url"):
        cache = os.path.expanduser(config.cache_dir or _URL_CACHE)
        target = os.path.join(cache, os.path.basename(pcfg["url"]))
        if os.path.isfile(target):
            return ResolvedWeights(target, "", pcfg)
        looked.append(target)
    return ResolvedWeights(
        None,
        f"CLIP weights {config.model_name}/{tag} are not in the local cache (looked for: "
        f"{'; '.join(looked)}). The harness never downloads: fetch them once where the network "
        f"allows (open_clip.create_model_and_transforms({config.model_name!r}, "
        f"pretrained={tag!r})) or pass checkpoint_path=<local file>",
        pcfg,
    )


def preprocess_images(images: torch.Tensor, size: int | tuple[int, int], mean, std) -> torch.Tensor:
    """Harness images to CLIP input.

    Args:
        images: ``# [B, C, H, W]`` in [-1, 1], C = 1 (replicated to RGB) or 3.
        size: the model's input size (int: square).
        mean: per-channel normalisation mean (3 values).
        std: per-channel normalisation standard deviation (3 values).

    Returns:
        ``# [B, 3, size_h, size_w]`` float32: ``((x + 1) / 2`` bicubically resized (antialiased),
        clamped to [0, 1], then ``(x - mean) / std``.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 1 or 3, H, W], got {tuple(images.shape)}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = ((images.detach().float() + 1.0) / 2.0).clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[2:]) != hw:
        x = F.interpolate(x, size=hw, mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    return (x - mean_t) / std_t


class CLIPCosine(AttributionMethod):
    """Cosine similarity of CLIP image embeddings (open_clip), query vs training image."""

    Config: ClassVar[type] = CLIPConfig
    invariant_config_fields: ClassVar[dict[str, tuple[Any, Any]]] = {"batch_size": (1, 7)}

    def availability(self) -> tuple[bool, str]:
        """Whether local CLIP weights were found, and where the search looked if not."""
        resolved = resolve_weights(self.config)
        return resolved.path is not None, resolved.reason

    def load_model(self, device: torch.device | str = "cpu"):
        """The open_clip model with the resolved local weights, in eval mode.

        Raises:
            MethodUnavailableError: no local weights (the reason says where it looked).
        """
        import open_clip  # deferred: heavy; loaded only when CLIP runs

        resolved = resolve_weights(self.config)
        if resolved.path is None:
            raise MethodUnavailableError(resolved.reason)
        pcfg = resolved.pretrained_cfg
        model, _, _ = open_clip.create_model_and_transforms(
            self.config.model_name,
            pretrained=resolved.path,
            device=device,
            force_quick_gelu=bool(pcfg.get("quick_gelu", False)),
            image_mean=pcfg.get("mean"),
            image_std=pcfg.get("std"),
            require_pretrained=True,
        )
        return model.eval()

    @torch.no_grad()
    def embed(self, model, images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Image embeddings of ``images``, ``batch_size`` at a time.

        Args:
            model: the open_clip model (:meth:`load_model`).
            images: ``# [B, C, H, W]`` harness images in [-1, 1].
            device: where to embed.

        Returns:
            ``# [B, embed_dim]`` float32 embeddings on the CPU (not normalised).
        """
        import open_clip  # deferred: heavy; loaded only when CLIP runs

        cfg = open_clip.get_model_preprocess_cfg(model)
        out = []
        for start in range(0, images.shape[0], self.config.batch_size):
            chunk = images[start : start + self.config.batch_size].to(device)
            x = preprocess_images(chunk, cfg["size"], cfg["mean"], cfg["std"])
            out.append(model.encode_image(x).float().cpu())
        return torch.cat(out)

    def score(self, ctx: MethodContext) -> np.ndarray:
        """``# [n_queries, n_train]`` float64 cosine similarities of CLIP embeddings."""
        device = torch.device(ctx.device)
        model = self.load_model(device)
        train = self.embed(model, ctx.train_images, device)  # [N, D]
        queries = self.embed(model, ctx.query_images, device)  # [Q, D]
        return cosine_similarity_matrix(queries, train)
