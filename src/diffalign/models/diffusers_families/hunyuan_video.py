"""HunyuanVideo (Kong et al. 2024, "HunyuanVideo: A Systematic Framework for Large Video Generative
Models"), the video model DanceGRPO trains: a dual- then single-stream DiT on rectified flow with a
Llama text encoder, CLIP pooled text and a distilled-guidance embedding."""

from __future__ import annotations

import torch
from torch import Tensor

from ..diffusers_options import DiffusersCond
from ._video import VideoDenoiser


class HunyuanVideoDenoiser(VideoDenoiser):
    """``HunyuanVideoPipeline``: the Llama hidden states two layers below the top behind the
    pipeline's prompt template (its first ``crop_start`` tokens dropped, padding masked), CLIP's
    pooled embedding, latents ``[16, (F - 1)/4 + 1, H/8, W/8]`` scaled by the VAE's
    ``scaling_factor``. The transformer embeds a distilled guidance scale (default 6, fed as
    ``1000 g``); classifier-free guidance is the pipeline's ``true_cfg_scale`` (default 1). The
    pipeline passes the sigmas ``linspace(1, 0, N + 1)[:-1]`` to a static shift (7), the
    ``sigma_min = 0`` grid."""

    default_frames = 129
    default_fps = 15.0
    default_size = (720, 1280)

    def _guidance_default(self) -> float | None:
        return 6.0 if self.backbone.config.get("guidance_embeds", False) else None

    @property
    def resolution_multiple(self) -> int:
        return self.vae_factor * self.backbone.config.patch_size

    def _schedule(self):
        return self._flow_schedule(dict(self._pipe.scheduler.config), sigma_min=0.0)

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        embeds, pooled, mask = self._pipe.encode_prompt(prompt=[str(p) for p in prompts], device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
        guidance = None if self.guidance is None else torch.full((len(prompts),), self.guidance, device=self.device,
                                                                 dtype=torch.float32)
        return DiffusersCond(embeds, pooled, guidance=guidance, mask=mask)

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        guidance = None if cond.guidance is None else self._cast(cond.guidance) * 1000.0
        return {"hidden_states": x, "timestep": self._timestep(t), "encoder_hidden_states": self._cast(cond.embeds),
                "encoder_attention_mask": self._cast(cond.mask), "pooled_projections": self._cast(cond.pooled),
                "guidance": guidance}
