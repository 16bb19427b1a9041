"""Rewards and held-out metrics for videos and for image-conditioned generation.

* ``temporal_consistency``: the mean cosine similarity of consecutive frames' CLIP image
  embeddings -- 1 for a still video, lower when the content changes between frames (the
  frame-consistency measure of video editing and generation papers, e.g. Esser et al. 2023,
  "Structure and Content-Guided Video Synthesis with Diffusion Models").
* ``motion_magnitude``: the mean absolute difference of consecutive frames (pixels in [0, 1]) --
  0 for a still video. A target reward that rises while motion collapses ("the video stopped
  moving") is reward hacking; logged as a held-out reward it shows in the report.
* ``source_clip`` / ``source_l2``: how close an output stays to the prompt's conditioning image
  (``core.prompts.Prompt.images[0]``): the CLIP image cosine, and minus the mean squared pixel
  distance on images pooled to ``size`` (a perceptual-model-free pixel metric). For editing as
  held-out rewards (an edit that ignores the source scores low); on an image-to-video model with
  ``frames=0`` they score the first frame against the image it was conditioned on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_positive
from ..core.prompts import load_image, prompt_images
from .base import Reward
from .clip_common import HF_CLIP_FILES, ClipReward, as_dir, image_settings, load_clip


class _ClipImageReward(ClipReward):
    def __init__(self, path: Any = None, device: str = "cpu", dtype: str = "float32"):
        directory = as_dir(path, self.name, HF_CLIP_FILES)
        model, tok = load_clip(directory, self.name)
        self._setup(model, tok, device, dtype, *image_settings(directory, model.config.vision_config.image_size))


class TemporalConsistency(_ClipImageReward):
    """``mean_f cos(E(x_f), E(x_{f+1}))`` over consecutive frames (1 for one frame)."""

    name = "temporal_consistency"
    video = True

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        B, Fr = images.shape[:2]
        if Fr < 2:
            return torch.ones(B, device=images.device)
        emb = self.encode_image(images.flatten(0, 1)).view(B, Fr, -1)
        return (emb[:, 1:] * emb[:, :-1]).sum(-1).mean(1)


class MotionMagnitude(Reward):
    """``mean_f mean |x_{f+1} - x_f|`` over consecutive frames, pixels in [0, 1]; differentiable."""

    name = "motion_magnitude"
    video = True
    differentiable = True

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        if images.shape[1] < 2:
            return images.new_zeros(images.shape[0])
        return (images[:, 1:] - images[:, :-1]).abs().flatten(1).mean(1)


def source_images(prompts: list[str], size: tuple[int, int], name: str) -> Tensor:
    """Each prompt's first conditioning image, ``[B, 3, H, W]`` in [0, 1] at ``size``."""
    missing = [p for p in prompts if not prompt_images(p)]
    if missing:
        raise ValueError(f"{name} compares with the prompt's conditioning image; {missing[0]!r} has none (give "
                         'prompts as JSONL lines {"prompt": ..., "image": PATH})')
    return torch.stack([load_image(prompt_images(p)[0], size) for p in prompts])


class SourceClip(_ClipImageReward):
    """``cos(E(x), E(source))``: CLIP image similarity to the conditioning image."""

    name = "source_clip"

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        src = source_images(prompts, tuple(images.shape[-2:]), self.name).to(images.device)
        with torch.no_grad():
            ref = self.encode_image(src)
        return (self.encode_image(images) * ref).sum(-1)


class SourceL2(Reward):
    """``-mean (pool(x) - pool(source))^2`` with both images average-pooled to ``size`` x ``size``
    (0 for an exact copy; pooling keeps the metric about layout and colour, not texture)."""

    name = "source_l2"
    differentiable = True

    def __init__(self, size: int = 64):
        self.size = check_positive("size", size, integer=True)

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        src = source_images(prompts, tuple(images.shape[-2:]), self.name).to(images.device, images.dtype)
        s = min(self.size, *images.shape[-2:])
        a, b = F.adaptive_avg_pool2d(images, s), F.adaptive_avg_pool2d(src, s)
        return -(a - b).pow(2).flatten(1).mean(1)
