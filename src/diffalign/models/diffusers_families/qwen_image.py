"""Qwen-Image (Qwen Team 2025, "Qwen-Image Technical Report") and Qwen-Image-Edit: an MMDiT on
rectified flow with 2x2-packed latent tokens and a Qwen2.5-VL text encoder."""

from __future__ import annotations

import torch
from torch import Tensor

from ...core.parametrization import cfg
from ..diffusers_options import DiffusersCond
from .flux import FluxDenoiser
from .wan import _to_pil


class QwenImageDenoiser(FluxDenoiser):
    """``QwenImagePipeline``. Text: the last hidden layer of Qwen2.5-VL behind the pipeline's chat
    template, the template's system prefix dropped and padding masked (no pooled embedding); rows
    are kept unpadded and padded per batch. Latents ``[16, H/8, W/8]`` (the pipeline's one-frame
    ``[16, 1, H/8, W/8]``) normalised by the VAE's ``latents_mean`` / ``latents_std``, 2x2-packed.
    Schedule: the dynamic shift at the adapter's resolution, ``shift_terminal`` from the config, the
    pipeline's ``linspace(1, 1/N, N)`` grid. Guidance is the pipeline's ``true_cfg_scale`` with a
    negative prompt, whose guided prediction is rescaled per token to the conditional prediction's
    norm (:meth:`combine_guidance`)."""

    ragged_text = True

    def _guidance_default(self) -> float | None:
        return 1.0 if self.backbone.config.get("guidance_embeds", False) else None

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    def _vae_factor(self) -> int:
        return int(self._pipe.vae_scale_factor)

    def _text(self, prompts: list[str], **kw) -> DiffusersCond:
        embeds, mask = self._pipe.encode_prompt(prompt=[str(p) for p in prompts], device=self.device,
                                                max_sequence_length=self.max_sequence_length, **kw)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        guidance = None if self.guidance is None else torch.full((len(prompts),), self.guidance, device=self.device,
                                                                 dtype=torch.float32)
        return DiffusersCond(embeds, guidance=guidance, mask=mask)

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        return self._text(prompts)

    def _img_shapes(self, x: Tensor, cond: DiffusersCond) -> list:
        h, w = x.shape[-2:]
        return [[(1, h // 2, w // 2)]] * x.shape[0]

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        embeds, mask = self._trim_text(cond)
        return {"hidden_states": self.pack(x), "timestep": self._timestep(t), "guidance": cond.guidance,
                "encoder_hidden_states": self._cast(embeds), "encoder_hidden_states_mask": mask,
                "img_shapes": self._img_shapes(x, cond)}

    def combine_guidance(self, cond_out: Tensor, uncond_out: Tensor, guidance_scale: float) -> Tensor:
        """Qwen-Image's true CFG: ``u + w (c - u)``, rescaled per packed token to the norm of ``c``."""
        guided = self.pack(cfg(cond_out, uncond_out, guidance_scale))
        c = self.pack(cond_out)
        out = guided * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))
        return self.unpack(out, *cond_out.shape[-2:])

    # ----- the VAE: a video VAE fed one frame ------------------------------------------------

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        c = self.vae.config
        shape = (1, -1, 1, 1, 1)
        return (torch.tensor(c.latents_mean).view(shape).to(like.device, like.dtype),
                torch.tensor(c.latents_std).view(shape).to(like.device, like.dtype))

    def decode(self, x: Tensor) -> Tensor:
        vae = self.vae
        z = x[:, :, None].to(vae.dtype)
        mean, std = self._stats(z)
        z = z * std + mean
        images = [vae.decode(c, return_dict=False)[0][:, :, 0] for c in z.split(self.options.decode_batch_size)]
        return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor) -> Tensor:
        z = self._vae_mean(images[:, :, None])
        mean, std = self._stats(z)
        return ((z - mean) / std)[:, :, 0].float()


class QwenImageEditDenoiser(QwenImageDenoiser):
    """``QwenImageEditPipeline``: the conditioning image enters twice -- through Qwen2.5-VL beside the
    instruction (the template's image slot), and as VAE latents packed after the noise tokens (the
    prediction of the noise tokens is kept). The pipeline resizes the image to about one megapixel
    whatever the output size; diffalign resizes it to the model's resolution."""

    images_per_prompt = (1, 1)

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        images = [im[0] for im in self.condition_images(prompts)]
        cond = self._text(prompts, image=[_to_pil(im) for im in images])
        stacked = torch.stack(images)[:, :, None]  # [B, 3, 1, H, W]
        z = self._vae_mean(stacked)
        mean, std = self._stats(z)
        cond.image_latents = ((z - mean) / std)[:, :, 0].to(cond.embeds.dtype)
        return cond

    def _img_shapes(self, x: Tensor, cond: DiffusersCond) -> list:
        h, w = x.shape[-2:]
        rh, rw = cond.image_latents.shape[-2:]
        return [[(1, h // 2, w // 2), (1, rh // 2, rw // 2)]] * x.shape[0]

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        kw = super()._inputs(x, t, cond)
        kw["hidden_states"] = torch.cat([kw["hidden_states"], self.pack(self._cast(cond.image_latents))], dim=1)
        return kw

    def _output(self, out: Tensor, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        return self.unpack(out[:, : (H // 2) * (W // 2)], H, W)
