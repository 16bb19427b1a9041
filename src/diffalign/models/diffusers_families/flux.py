"""FLUX.1 (Black Forest Labs 2024) and FLUX.1-Kontext (Labs et al. 2025, "FLUX.1 Kontext: Flow
Matching for In-Context Image Generation and Editing"): an MMDiT on rectified flow with 2x2-packed
latent tokens, CLIP pooled + T5 text, and (dev) a distilled-guidance embedding."""

from __future__ import annotations

import torch
from torch import Tensor

from ..diffusers_adapter import DiffusersDenoiser
from ..diffusers_options import DiffusersCond


class FluxDenoiser(DiffusersDenoiser):
    """FLUX.1-dev / -schnell. The timestep is ``t`` itself (the transformer scales by 1000); the
    dynamic shift is resolved at the adapter's resolution (``mu`` from the packed sequence length)
    and the grid is the pipeline's ``linspace(1, 1/N, N)`` (``sigma_min = 0``). The distilled
    guidance (dev, default 3.5) travels in ``cond.guidance``."""

    def _guidance_default(self) -> float | None:
        return 3.5 if self.backbone.config.get("guidance_embeds", False) else None

    def _native_size(self) -> tuple[int, int]:
        return 128 * self.vae_factor, 128 * self.vae_factor

    @property
    def latent_channels(self) -> int:
        return self.backbone.config.in_channels // 4

    def _schedule(self):
        h, w = self.latent_size
        return self._flow_schedule(dict(self._pipe.scheduler.config), seq_len=(h // 2) * (w // 2), sigma_min=0.0)

    @property
    def sampling_defaults(self) -> dict:
        d = super().sampling_defaults
        if self.guidance is None and self.options.num_steps is None:  # FLUX.1-schnell: 4 steps, no guidance
            d["num_steps"] = 4
        return d

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        embeds, pooled, _ = self._pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                     num_images_per_prompt=1,
                                                     max_sequence_length=self.max_sequence_length)
        guidance = None if self.guidance is None else torch.full((len(prompts),), self.guidance, device=self.device,
                                                                 dtype=torch.float32)
        return DiffusersCond(embeds, pooled, guidance=guidance)

    def _timestep(self, t: Tensor) -> Tensor:
        return t.to(self.compute_dtype)  # the transformer scales by 1000 itself

    def _flux_ids(self, n_txt: int, h: int, w: int, device, dtype, offset: float = 0.0) -> tuple[Tensor, Tensor]:
        key = (n_txt, h, w, device, dtype, offset)
        if key not in self._ids_cache:
            img = torch.zeros(h // 2, w // 2, 3)
            img[..., 0] = offset
            img[..., 1] += torch.arange(h // 2)[:, None]
            img[..., 2] += torch.arange(w // 2)[None, :]
            self._ids_cache[key] = (torch.zeros(n_txt, 3, device=device, dtype=dtype),
                                    img.reshape(-1, 3).to(device=device, dtype=dtype))
        return self._ids_cache[key]

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        """FLUX packing: ``[B, C, H, W]`` -> ``[B, H/2 * W/2, 4C]`` (2x2 patches as tokens)."""
        B, C, H, W = x.shape
        return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)

    @staticmethod
    def unpack(x: Tensor, H: int, W: int) -> Tensor:
        B, _, D = x.shape
        return x.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, H, W)

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        if self.guidance is not None and cond.guidance is None:
            raise ValueError("this FLUX transformer embeds guidance; cond.guidance is missing (use encode_prompts)")
        H, W = x.shape[-2:]
        embeds = self._cast(cond.embeds)
        txt_ids, img_ids = self._flux_ids(embeds.shape[1], H, W, x.device, x.dtype)
        return {"hidden_states": self.pack(x), "timestep": self._timestep(t), "guidance": cond.guidance,
                "pooled_projections": self._cast(cond.pooled), "encoder_hidden_states": embeds, "txt_ids": txt_ids,
                "img_ids": img_ids}

    def _output(self, out: Tensor, x: Tensor) -> Tensor:
        return self.unpack(out, *x.shape[-2:])


class FluxKontextDenoiser(FluxDenoiser):
    """FLUX.1-Kontext: the conditioning image's latents are packed beside the noise tokens (image
    ids with time coordinate 1) and the prediction of the noise tokens is kept. The pipeline resizes
    the image to its preferred ~1 megapixel resolutions (``_auto_resize``); diffalign resizes it to
    the model's resolution (the pipeline with ``_auto_resize=False`` at that size)."""

    images_per_prompt = (1, 1)

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        cond = super()._encode(prompts)
        images = torch.stack([im[0] for im in self.condition_images(prompts)])
        scale, shift = self._vae_factors()
        cond.image_latents = ((self._vae_mean(images) - shift) * scale).to(cond.embeds.dtype)
        return cond

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        kw = super()._inputs(x, t, cond)
        ref = self._cast(cond.image_latents)
        _, ref_ids = self._flux_ids(0, *ref.shape[-2:], x.device, x.dtype, offset=1.0)
        kw["hidden_states"] = torch.cat([kw["hidden_states"], self.pack(ref)], dim=1)
        kw["img_ids"] = torch.cat([kw["img_ids"], ref_ids])
        return kw

    def _output(self, out: Tensor, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        return self.unpack(out[:, : (H // 2) * (W // 2)], H, W)
