"""Stable Diffusion 1.x / 2.x and SDXL: a UNet on VP diffusion (Rombach et al. 2022; Podell et al. 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..diffusers_adapter import DiffusersDenoiser
from ..diffusers_options import DiffusersCond


class SDDenoiser(DiffusersDenoiser):
    """SD 1.x / 2.x: CLIP hidden states, ``epsilon`` / ``v_prediction`` from the scheduler config,
    the timestep is the discrete VP step ``k = t T - 1``."""

    backbone_name = "unet"

    @staticmethod
    def load_kwargs(class_name: str) -> dict:
        if class_name == "StableDiffusionPipeline":  # no safety checker in a training loop
            return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        return {}

    @property
    def resolution_multiple(self) -> int:
        return self.vae_factor * 2 ** (len(self.backbone.config.block_out_channels) - 1)

    def _schedule(self):
        return self._vp_schedule(dict(self._pipe.scheduler.config))

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        embeds, _ = self._pipe.encode_prompt(prompts, self.device, 1, False)
        return DiffusersCond(embeds)

    def _timestep(self, t: Tensor) -> Tensor:
        return self._vp_timestep(t)

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        return {"sample": x, "timestep": self._timestep(t), "encoder_hidden_states": self._cast(cond.embeds)}


class SDXLDenoiser(SDDenoiser):
    """SDXL: two CLIP encoders, the pooled embedding and ``add_time_ids = (H, W, 0, 0, H, W)``; with
    ``force_zeros_for_empty_prompt`` the empty prompt encodes to zeros (the pipeline's negative)."""

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        pipe, n = self._pipe, len(prompts)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        if pipe.config.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
        size = (self.height, self.width)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=proj)
        return DiffusersCond(embeds, pooled, time_ids.to(self.device).expand(n, -1).contiguous())

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        kw = super()._inputs(x, t, cond)
        kw["added_cond_kwargs"] = {"text_embeds": self._cast(cond.pooled), "time_ids": self._cast(cond.time_ids)}
        return kw
