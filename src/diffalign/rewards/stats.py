"""Image-statistics rewards: the prompt-independent tasks of DDPO (Black et al. 2023,
"Training Diffusion Models with Reinforcement Learning") and two simple differentiable ones.

* ``brightness``: mean luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601), in [0, 1].
* ``saturation``: mean HSV saturation ``(max - min) / max`` per pixel (0 for black), in [0, 1].
* ``colorfulness``: Hasler & Suesstrunk (2003), "Measuring colourfulness in natural images":
  ``sigma_rgyb + 0.3 mu_rgyb`` with ``rg = R - G``, ``yb = (R + G) / 2 - B``, computed on
  0..255 values as in the paper (natural images score 0..~150).
* ``jpeg_compressibility`` / ``jpeg_incompressibility``: minus / plus the size in kB (1000
  bytes) of the image saved by PIL as JPEG at quality 95, after rounding to uint8 -- DDPO's
  compressibility tasks. Not differentiable.

The first three keep the autograd graph (``differentiable = True``).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import Tensor

from ..config import check_range
from .base import Reward

LUMA = (0.299, 0.587, 0.114)


class Brightness(Reward):
    """Mean BT.601 luma in [0, 1]."""

    name = "brightness"
    differentiable = True

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        w = torch.tensor(LUMA, dtype=images.dtype, device=images.device)
        return torch.einsum("bchw,c->b", images, w) / (images.shape[2] * images.shape[3])


class Saturation(Reward):
    """Mean HSV saturation ``(max_c - min_c) / max_c`` (``eps`` guards black pixels)."""

    name = "saturation"
    differentiable = True

    def __init__(self, eps: float = 1e-3):
        self.eps = check_range("eps", eps, 0, None, lo_open=True)

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        mx, mn = images.amax(1), images.amin(1)
        return ((mx - mn) / (mx + self.eps)).mean((1, 2))


class Colorfulness(Reward):
    """Hasler-Suesstrunk colourfulness ``sqrt(var_rg + var_yb) + 0.3 sqrt(mu_rg^2 + mu_yb^2)`` (0..255 scale)."""

    name = "colorfulness"
    differentiable = True

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        x = images * 255.0
        rg = (x[:, 0] - x[:, 1]).flatten(1)
        yb = (0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]).flatten(1)
        sd = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + 1e-8).sqrt()
        mu = (rg.mean(1) ** 2 + yb.mean(1) ** 2 + 1e-8).sqrt()
        return sd + 0.3 * mu


def jpeg_size_kb(images: Tensor, quality: int = 95) -> np.ndarray:
    """Sizes in kB (1000 bytes) of ``images`` ([B, 3, H, W] in [0, 1]) saved by PIL as JPEG."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return np.asarray(sizes, np.float32)


class JpegCompressibility(Reward):
    """``-(JPEG size in kB)`` at ``quality`` (DDPO's compressibility reward): higher = simpler image."""

    name = "jpeg_compressibility"
    differentiable = False
    sign = -1.0

    def __init__(self, quality: int = 95):
        self.quality = check_range("quality", quality, 1, 100, integer=True)

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        return torch.from_numpy(self.sign * jpeg_size_kb(images, self.quality))


class JpegIncompressibility(JpegCompressibility):
    """``+(JPEG size in kB)`` at ``quality`` (DDPO's incompressibility reward): higher = busier image."""

    name = "jpeg_incompressibility"
    sign = 1.0
