"""Wan 2.1 / 2.2 (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models"):
a video DiT on rectified flow with UMT5 text, text-to-video and image-to-video."""

from __future__ import annotations

import torch
from torch import Tensor

from ..diffusers_options import DiffusersCond
from ._video import VideoDenoiser


class WanDenoiser(VideoDenoiser):
    """Wan text-to-video (``WanPipeline``). Latents ``[16, (F - 1)/4 + 1, H/8, W/8]`` normalised by
    the VAE's ``latents_mean`` / ``latents_std``; UMT5 embeddings zero-padded to 512 tokens; the
    timestep is ``1000 t``. The published repositories ship ``UniPCMultistepScheduler`` with
    ``use_flow_sigmas`` and a ``flow_shift``: a flow-matching model behind a multistep solver, so
    the schedule is ``FlowSchedule(flow_shift, sigma_min)`` -- the grid
    ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)`` gives -- and the solver is diffalign's.
    Wan 2.2 TI2V-5B (``expand_timesteps``) takes the timestep per latent token."""

    default_fps = 16.0

    def __init__(self, pipe, **kw):
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("boundary_ratio") is not None:
            raise ValueError(f"{type(pipe).__name__} with two experts (transformer_2, boundary_ratio: Wan 2.2 A14B) is "
                             "not supported: diffalign trains one backbone; Wan 2.1 and Wan 2.2 TI2V-5B are supported")
        super().__init__(pipe, **kw)

    @property
    def resolution_multiple(self) -> int:
        return self.vae_factor * self.backbone.config.patch_size[1]

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    def _schedule(self):
        cfg = dict(self._pipe.scheduler.config)
        name = str(cfg.get("_class_name", ""))
        if "FlowMatch" in name:
            return self._flow_schedule(cfg)
        if not cfg.get("use_flow_sigmas") or cfg.get("prediction_type") != "flow_prediction":
            raise ValueError(f"{self.arch}: scheduler {name!r} must be a flow-matching scheduler (FlowMatch*, or a "
                             f"multistep solver with use_flow_sigmas=True and prediction_type='flow_prediction')")
        if cfg.get("use_dynamic_shifting"):
            raise ValueError(f"{self.arch}: use_dynamic_shifting in {name!r} is not supported")
        return self._flow_schedule(cfg, shift_key="flow_shift")

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        embeds, _ = self._pipe.encode_prompt(prompt=[str(p) for p in prompts], do_classifier_free_guidance=False,
                                             num_videos_per_prompt=1, max_sequence_length=self.max_sequence_length,
                                             device=self.device)
        return DiffusersCond(embeds)

    def _timestep(self, t: Tensor, x: Tensor | None = None) -> Tensor:
        ts = t.float() * 1000
        if self._pipe.config.get("expand_timesteps", False) and x is not None:  # one timestep per latent token
            p = self.backbone.config.patch_size
            n = (x.shape[2] // p[0]) * (x.shape[3] // p[1]) * (x.shape[4] // p[2])
            ts = ts[:, None].expand(-1, n)
        return ts

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        return {"hidden_states": x, "timestep": self._timestep(t, x), "encoder_hidden_states": self._cast(cond.embeds)}


class WanI2VDenoiser(WanDenoiser):
    """Wan image-to-video (``WanImageToVideoPipeline``, Wan 2.1 I2V). The backbone takes 36 input
    channels: the 16 noise channels, a 4-channel mask (1 on the first frame) and the 16-channel
    latents of the conditioning image followed by black frames; the image's CLIP vision features
    (penultimate hidden states) enter through the blocks' extra key / value projections. The
    pipeline cleans prompts with ``ftfy`` (a dependency of the diffusers extra)."""

    images_per_prompt = (1, 1)

    def __init__(self, pipe, **kw):
        if pipe.config.get("expand_timesteps", False):
            raise ValueError("WanImageToVideoPipeline with expand_timesteps (Wan 2.2 TI2V-5B image-to-video, which "
                             "overwrites the first latent frame) is not supported; its text-to-video mode is")
        super().__init__(pipe, **kw)

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        pipe = self._pipe
        cond = super()._encode(prompts)
        images = [im[0] for im in self.condition_images(prompts)]
        if self.backbone.config.get("image_dim") is not None:  # CLIP sees the image at its own size, as in the pipeline
            originals = [im[0] for im in self.condition_images(prompts, size=False)]
            cond.image_embeds = torch.cat([pipe.encode_image(_to_pil(im), self.device) for im in originals])
        cond.image_latents = self._condition_latents(torch.stack(images))
        return cond

    def _condition_latents(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, 4 + 16, F', h, w]``: the first-frame mask and the latents
        of the image followed by ``F - 1`` black frames (the pipeline's ``prepare_latents``)."""
        B, F, T = images.shape[0], self.num_frames, self.temporal_factor
        h, w = self.latent_size
        video = torch.cat([images[:, :, None] * 2 - 1, images.new_zeros(B, 3, F - 1, *images.shape[-2:])], dim=2)
        vae = self.vae
        z = vae.encode(video.to(self.device, vae.dtype)).latent_dist.mode()
        mean, std = self._normalisation(z)
        z = (z - mean) / std
        mask = torch.zeros(B, 1, F, h, w, device=z.device, dtype=z.dtype)
        mask[:, :, 0] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(T, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(B, -1, T, h, w).transpose(1, 2)  # [B, T, F', h, w]
        return torch.cat([mask, z], dim=1)

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        kw = super()._inputs(x, t, cond)
        kw["hidden_states"] = torch.cat([x, self._cast(cond.image_latents)], dim=1)
        kw["encoder_hidden_states_image"] = self._cast(cond.image_embeds)
        return kw


def _to_pil(image: Tensor):
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
