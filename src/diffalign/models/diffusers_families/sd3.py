"""Stable Diffusion 3 / 3.5: an MMDiT on rectified flow (Esser et al. 2024)."""

from __future__ import annotations

from torch import Tensor

from ..diffusers_adapter import DiffusersDenoiser
from ..diffusers_options import DiffusersCond


class SD3Denoiser(DiffusersDenoiser):
    """Two CLIP encoders and T5 (``max_sequence_length`` 256), pooled projections; the timestep is
    ``1000 t``; ``FlowSchedule(shift, sigma_min)`` with the scheduler's own shifted ``sigma_min``."""

    @property
    def resolution_multiple(self) -> int:
        return self.vae_factor * self.backbone.config.patch_size

    def _schedule(self):
        return self._flow_schedule(dict(self._pipe.scheduler.config))

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        embeds, _, pooled, _ = self._pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return DiffusersCond(embeds, pooled)

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        return {"hidden_states": x, "timestep": self._timestep(t), "encoder_hidden_states": self._cast(cond.embeds),
                "pooled_projections": self._cast(cond.pooled)}
