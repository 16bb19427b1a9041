"""FLUX.2 [dev] and [klein] (Black Forest Labs 2025): a transformer on rectified flow over
2x2-patchified latents normalised by the VAE's BatchNorm statistics, with text features from
several hidden layers of a decoder-only text encoder, and optional reference images."""

from __future__ import annotations

import torch
from torch import Tensor

from ..diffusers_options import DiffusersCond
from .flux import FluxDenoiser


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's time-shift exponent, fitted by Black Forest Labs as a function of the image
    sequence length and the number of sampling steps (linear in both below 4300 tokens; as in
    diffusers' ``pipeline_flux2.compute_empirical_mu``)."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


class Flux2Denoiser(FluxDenoiser):
    """``Flux2Pipeline`` (FLUX.2 [dev]). Text: Mistral-3 hidden layers 10, 20 and 30 behind the
    pipeline's system message, concatenated per token (``text_ids`` number the tokens). Latents:
    the VAE latent patchified 2x2 and normalised with the VAE's BatchNorm running statistics,
    ``sample_shape = (4 C, H/16, W/16)`` (the pipeline's own noise layout), one token per position.
    The time shift is ``exp(mu)`` with ``mu`` from the pipeline's empirical formula of the sequence
    length and the step count -- resolved at load time for ``num_steps`` (``diffalign.json``; the
    pipeline's default 50), so sampling with that step count matches the pipeline exactly. The
    transformer embeds a distilled guidance scale (default 4); classifier-free guidance is off
    (``guidance_scale`` 1). Prompts may carry up to 10 reference images, resized to the model's
    resolution, packed after the noise tokens with time coordinates 10, 20, ..."""

    images_per_prompt = (0, 10)
    text_layers = (10, 20, 30)

    def _guidance_default(self) -> float | None:
        return 4.0 if self.backbone.config.get("guidance_embeds", False) else None

    def _vae_factor(self) -> int:
        return int(self._pipe.vae_scale_factor)

    @property
    def resolution_multiple(self) -> int:
        return self.vae_factor * 2

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // (2 * self.vae_factor), self.width // (2 * self.vae_factor)

    @property
    def latent_channels(self) -> int:
        return self.backbone.config.in_channels

    @property
    def sampling_defaults(self) -> dict:
        return super(FluxDenoiser, self).sampling_defaults

    def _schedule(self):
        h, w = self.latent_size
        steps = int(self.sampling_defaults["num_steps"])
        return self._flow_schedule(dict(self._pipe.scheduler.config), sigma_min=0.0,
                                   mu=compute_empirical_mu(h * w, steps))

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        embeds, _ = self._pipe.encode_prompt(prompt=[str(p) for p in prompts], device=self.device,
                                             max_sequence_length=self.max_sequence_length,
                                             text_encoder_out_layers=self.text_layers)
        guidance = None if self.guidance is None else torch.full((len(prompts),), self.guidance, device=self.device,
                                                                 dtype=torch.float32)
        cond = DiffusersCond(embeds, guidance=guidance)
        images = self.condition_images(prompts)
        if images[0]:
            cond.image_latents = torch.stack([self._to_model(self._vae_mean(torch.stack(im))) for im in images])
        return cond

    # ----- latents: VAE latent <-> patchified, BatchNorm-normalised model latent ------------------

    def _bn(self, like: Tensor) -> tuple[Tensor, Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def _to_model(self, z: Tensor) -> Tensor:
        B, C, H, W = z.shape
        z = z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, C * 4, H // 2, W // 2)
        mean, std = self._bn(z)
        return (z - mean) / std

    def _to_vae(self, x: Tensor) -> Tensor:
        mean, std = self._bn(x)
        x = x * std + mean
        B, C, H, W = x.shape
        return x.reshape(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C // 4, H * 2, W * 2)

    def decode(self, x: Tensor) -> Tensor:
        vae = self.vae
        z = self._to_vae(x.to(vae.dtype))
        images = [vae.decode(c, return_dict=False)[0] for c in z.split(self.options.decode_batch_size)]
        return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor) -> Tensor:
        return self._to_model(self._vae_mean(images)).float()

    # ----- the transformer: one token per latent position, 4-D position ids (t, h, w, l) ---------

    def _ids(self, n: int, h: int, w: int, t: float, device) -> Tensor:
        key = ("flux2", n, h, w, t, device)
        if key not in self._ids_cache:
            if n:  # text: l = 0 .. n - 1
                ids = torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(n).float())
            else:  # an image at time coordinate t
                ids = torch.cartesian_prod(torch.full((1,), t), torch.arange(h).float(), torch.arange(w).float(),
                                           torch.zeros(1))
            self._ids_cache[key] = ids.to(device=device, dtype=torch.long)
        return self._ids_cache[key]

    @staticmethod
    def tokens(x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        B, _, h, w = x.shape
        embeds = self._cast(cond.embeds)
        hidden, img_ids = [self.tokens(x)], [self._ids(0, h, w, 0.0, x.device)]
        if cond.image_latents is not None:  # reference images, time coordinates 10, 20, ...
            refs = self._cast(cond.image_latents)
            for i in range(refs.shape[1]):
                hidden.append(self.tokens(refs[:, i]))
                img_ids.append(self._ids(0, *refs.shape[-2:], 10.0 * (i + 1), x.device))
        return {"hidden_states": torch.cat(hidden, dim=1), "timestep": self._timestep(t), "guidance": cond.guidance,
                "encoder_hidden_states": embeds,
                "txt_ids": self._ids(embeds.shape[1], 0, 0, 0.0, x.device).expand(B, -1, -1),
                "img_ids": torch.cat(img_ids).expand(B, -1, -1)}

    def _output(self, out: Tensor, x: Tensor) -> Tensor:
        B, C, h, w = x.shape
        return out[:, : h * w].transpose(1, 2).reshape(B, C, h, w)


class Flux2KleinDenoiser(Flux2Denoiser):
    """``Flux2KleinPipeline`` (FLUX.2 [klein]): Qwen3 hidden layers 9, 18 and 27 behind its chat
    template; no guidance embedding. The base model samples with classifier-free guidance against
    the empty prompt (default 4, 50 steps); the step-distilled one (``is_distilled``) ignores any
    guidance scale and samples in 4 steps."""

    text_layers = (9, 18, 27)

    @property
    def sampling_defaults(self) -> dict:
        d = super().sampling_defaults
        if self._pipe.config.get("is_distilled", False):
            if self.options.guidance_scale not in (None, 1.0):
                raise ValueError(f"guidance_scale={self.options.guidance_scale}: this FLUX.2 [klein] is step-distilled "
                                 "and samples without classifier-free guidance (1.0)")
            d["guidance_scale"] = 1.0
            if self.options.num_steps is None:
                d["num_steps"] = 4
        return d
