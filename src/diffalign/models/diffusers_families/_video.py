"""What the video architectures share: a latent ``[C, F, H, W]`` (frames are one more axis the
core never looks at), ``num_frames`` / ``fps`` options, and a VAE that decodes to videos
``[B, F, 3, H, W]`` in ``[0, 1]``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..diffusers_adapter import DiffusersDenoiser


class VideoDenoiser(DiffusersDenoiser):
    """Base of the video families. Subclasses set the defaults below and the VAE normalisation
    (``latents_mean`` / ``latents_std`` or a ``scaling_factor``)."""

    is_video = True
    default_frames = 81  # the pipeline's num_frames default
    default_fps = 16.0
    default_size = (480, 832)  # (H, W): the pipeline's default resolution

    def _check_options(self) -> None:
        t = self.temporal_factor
        frames = self.num_frames
        if (frames - 1) % t:
            lo = (frames - 1) // t * t + 1
            raise ValueError(f"num_frames={frames} must be {t}k + 1 (the VAE compresses time by {t} after the first "
                             f"frame); use {lo} or {lo + t}")

    def _native_size(self) -> tuple[int, int]:
        return tuple(self.default_size)

    @property
    def temporal_factor(self) -> int:
        return int(getattr(self._pipe, "vae_scale_factor_temporal", 4))

    def _vae_factor(self) -> int:
        return int(getattr(self._pipe, "vae_scale_factor_spatial", 8))

    @property
    def num_frames(self) -> int:
        return int(self.options.num_frames or self.default_frames)

    @property
    def fps(self) -> float:
        return float(self.options.fps or self.default_fps)

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.temporal_factor + 1

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One video in model space: the VAE latent ``(C, F', H / f, W / f)``, ``F' = (F - 1) / 4 + 1``."""
        return (self.latent_channels, self.latent_frames, *self.latent_size)

    # ----- VAE: latents [B, C, F', h, w] <-> videos [B, F, 3, H, W] ----------------------------------

    def _normalisation(self, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """``(mean, std)`` with ``model latent = (raw - mean) / std``."""
        c = self.vae.config
        if c.get("latents_mean", None) is not None:
            shape = (1, -1, 1, 1, 1)
            mean = torch.tensor(c.latents_mean).view(shape).to(like.device, like.dtype)
            return mean, torch.tensor(c.latents_std).view(shape).to(like.device, like.dtype)
        return 0.0, 1.0 / float(c.scaling_factor)

    def _to_vae_layout(self, x: Tensor) -> Tensor:
        return x  # [B, C, F, h, w]

    def _from_vae_layout(self, z: Tensor) -> Tensor:
        return z

    def decode(self, x: Tensor) -> Tensor:
        """Latents ``[B, *sample_shape]`` -> videos ``[B, F, 3, H, W]`` in ``[0, 1]`` (float32),
        differentiable in ``x``; the VAE is frozen."""
        vae = self.vae
        z = self._to_vae_layout(x).to(vae.dtype)
        mean, std = self._normalisation(z)
        z = z * std + mean
        videos = [vae.decode(c, return_dict=False)[0] for c in z.split(self.options.decode_batch_size)]
        return (torch.cat(videos).float().transpose(1, 2) / 2 + 0.5).clamp(0, 1)

    def encode_images(self, videos: Tensor) -> Tensor:
        """Videos ``[B, F, 3, H, W]`` in ``[0, 1]`` -> latents (the posterior mean), the inverse of ``decode``."""
        z = self._vae_mean(videos.transpose(1, 2))
        mean, std = self._normalisation(z)
        return self._from_vae_layout((z - mean) / std).float()
