"""Fixed feature spaces and the set/pair metrics computed in them.

Two feature spaces, both fixed (nothing here is trained, nothing is downloaded):

* **pooled pixels** (:func:`pooled_pixels`): the image average-pooled to 8x8, flattened to 192
  numbers in ``[0, 1]``. Distances in it (:func:`rms_distance`: root-mean-square difference, also
  in ``[0, 1]``) are what *diversity* and per-image *drift* measure: they are easy to interpret
  ("the mean 4x4-block colour moved by 0.1") and ignore pixel-level noise.
* **the frozen encoder** (:class:`FeatureEncoder`): a small random-weight convolutional network
  with weights drawn from a fixed seed, giving 64 features per image. FID and KID
  (:func:`fid_kid`) are computed on these features with torchmetrics' implementations.
  Random-weight CNN features are a known, weight-free stand-in for Inception features; the
  numbers are comparable within one ``ENCODER_NAME`` only, not with published FIDs.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOL_SIZE = 8
ENCODER_NAME = "random-conv-v1"  # bump when FeatureEncoder's architecture or seed changes
ENCODER_INPUT = 32  # images are resized to this before encoding
ENCODER_SEED = 20240601


def _check_images(images: Any, what: str = "images", video: bool = False) -> Tensor:
    ok = isinstance(images, Tensor) and images.ndim in ((4, 5) if video else (4,)) and images.shape[-3] == 3
    if not ok:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        allowed = "[B, 3, H, W] (or videos [B, F, 3, H, W])" if video else "[B, 3, H, W]"
        raise ValueError(f"{what} must be a float tensor {allowed} in [0, 1], got {shape}")
    return images.detach().float().cpu()


def pooled_pixels(images: Tensor, size: int = POOL_SIZE) -> Tensor:
    """Images ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, 3 * size * size]`` block-mean colours; videos
    ``[B, F, 3, H, W]`` -> every frame's, ``[B, F * 3 * size * size]`` (distances then compare
    whole videos, motion included)."""
    x = _check_images(images, video=True)
    return F.adaptive_avg_pool2d(x.flatten(0, x.ndim - 4), size).reshape(x.shape[0], -1)


def rms_distance(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise root-mean-square difference of two feature batches ``[B, D]`` -> ``[B]``."""
    return (a - b).pow(2).mean(dim=1).sqrt()


def within_prompt_diversity(images: Tensor, num_prompts: int, per_prompt: int) -> float | None:
    """Mean pairwise pooled-pixel RMS distance between the ``per_prompt`` samples of each prompt,
    averaged over prompts. ``images`` are ordered prompt-major (all samples of prompt 0, then
    prompt 1, ...). 0 when every prompt's samples are identical; ``None`` when ``per_prompt < 2``.
    """
    if per_prompt < 2:
        return None
    feats = pooled_pixels(images)
    if feats.shape[0] != num_prompts * per_prompt:
        raise ValueError(f"got {feats.shape[0]} images for {num_prompts} prompts x {per_prompt} samples")
    feats = feats.view(num_prompts, per_prompt, -1).double()
    dist = torch.cdist(feats, feats) / math.sqrt(feats.shape[-1])  # [P, K, K] RMS distances
    iu = torch.triu_indices(per_prompt, per_prompt, offset=1)
    return float(dist[:, iu[0], iu[1]].mean())


def paired_drift(images: Tensor, base_images: Tensor) -> float:
    """Mean over images of the pooled-pixel RMS distance to the base image from the same seed."""
    a, b = pooled_pixels(images), pooled_pixels(base_images)
    if a.shape != b.shape:
        raise ValueError(f"drift needs the same number of images as the base: {a.shape[0]} vs {b.shape[0]}")
    return float(rms_distance(a.double(), b.double()).mean())


class FeatureEncoder(nn.Module):
    """A frozen random-weight CNN: ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, 64]`` features.

    Resize to 32x32 (area interpolation), map to ``[-1, 1]``, then three 3x3 conv + ReLU layers
    (3 -> 32 -> 64 -> 64 channels, 2x2 average pooling after the first two), adaptive average
    pooling to 2x2 (so the features keep coarse layout: left/right, top/bottom) and a fixed
    random projection 256 -> 64. He-scaled Gaussian weights come from ``numpy``'s
    ``default_rng(ENCODER_SEED)``, so every machine builds the same encoder without downloading
    anything. ``num_features`` tells torchmetrics the feature size.
    """

    num_features = 64

    def __init__(self, seed: int = ENCODER_SEED):
        super().__init__()
        rng = np.random.default_rng(seed)

        def gauss(*shape: int, fan_in: int) -> nn.Parameter:
            w = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
            return nn.Parameter(torch.from_numpy(w).float(), requires_grad=False)

        self.w1 = gauss(32, 3, 3, 3, fan_in=27)
        self.w2 = gauss(64, 32, 3, 3, fan_in=288)
        self.w3 = gauss(64, 64, 3, 3, fan_in=576)
        self.proj = gauss(256, self.num_features, fan_in=512)  # 1/sqrt(256) scale, as JL projections
        self.eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[-2:] != (ENCODER_INPUT, ENCODER_INPUT):
            x = F.interpolate(x, size=(ENCODER_INPUT, ENCODER_INPUT), mode="area")
        x = x * 2 - 1
        x = F.avg_pool2d(F.relu(F.conv2d(x, self.w1, padding=1)), 2)
        x = F.avg_pool2d(F.relu(F.conv2d(x, self.w2, padding=1)), 2)
        x = F.adaptive_avg_pool2d(F.relu(F.conv2d(x, self.w3, padding=1)), 2)
        return x.flatten(1) @ self.proj


_ENCODER: FeatureEncoder | None = None


def encoder() -> FeatureEncoder:
    """The shared frozen encoder (built once per process)."""
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = FeatureEncoder()
    return _ENCODER


def fid_kid(images: Tensor, ref_images: Tensor, *, kid_subsets: int = 50, kid_subset_size: int = 100,
            seed: int = 0) -> dict[str, float | None]:
    """FID and KID between ``images`` and ``ref_images`` on :class:`FeatureEncoder` features.

    Both come from torchmetrics (``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with
    our encoder as the custom ``feature`` module, so torch-fidelity's Inception is never built):
    FID is the Fréchet distance between Gaussians fitted to the two feature sets; KID is the
    unbiased squared MMD with the cubic polynomial kernel, averaged over ``kid_subsets`` random
    subsets of ``min(kid_subset_size, n)`` images (drawn from a fixed ``seed``; with a subset the
    size of the whole set, every subset is the full set and ``kid_std`` is 0). FID is biased
    upwards at small n -- compare values at equal n only; KID is unbiased and can be slightly
    negative. Returns ``{"fid", "kid", "kid_std"}``; values are ``None`` with fewer than 2 images.
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as e:  # pragma: no cover - torchmetrics ships with diffalign[rewards]
        raise ImportError("FID/KID need torchmetrics: pip install 'diffalign[rewards]'") from e

    x, ref = _check_images(images), _check_images(ref_images, "reference images")
    n = min(x.shape[0], ref.shape[0])
    if n < 2:
        return {"fid": None, "kid": None, "kid_std": None}
    enc = encoder()
    fid = FrechetInceptionDistance(feature=enc, normalize=True)
    fid.update(ref, real=True)
    fid.update(x, real=False)
    with warnings.catch_warnings():  # "KID keeps all features in memory": a few hundred 64-d rows here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=enc, normalize=True, subsets=kid_subsets,
                                      subset_size=min(kid_subset_size, n))
    kid.update(ref, real=True)
    kid.update(x, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": max(0.0, float(fid.compute())), "kid": float(kid_mean), "kid_std": float(kid_std)}
