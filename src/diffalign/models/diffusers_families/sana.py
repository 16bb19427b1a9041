"""SANA (Xie et al. 2024, "SANA: Efficient High-Resolution Image Synthesis with Linear Diffusion
Transformers"): a linear-attention DiT on rectified flow over a deep-compression autoencoder's
latents, with a Gemma-2 text encoder."""

from __future__ import annotations

import torch
from torch import Tensor

from ...core.prompts import is_unconditional
from ..diffusers_adapter import DiffusersDenoiser
from ..diffusers_options import DiffusersCond
from .wan import WanDenoiser


class SanaDenoiser(DiffusersDenoiser):
    """``SanaPipeline``. Text: Gemma-2's last hidden states, padding masked. The pipeline prepends
    its "complex human instruction" (a prompt-enhancing preamble) to prompts and keeps the first
    and the last ``max_sequence_length - 1`` tokens; the negative prompt of the unconditional
    branch is encoded without it -- so is diffalign's (``Prompt.unconditional``). The timestep is
    ``1000 t`` times the transformer's ``timestep_scale``. The published scheduler is DPM-Solver++
    with flow sigmas: its flow-DPM solver is not needed (sampling is diffalign's), the schedule is
    ``FlowSchedule(flow_shift, sigma_min)`` as for Wan. Latents: the DC-AE latent scaled by its
    ``scaling_factor``."""

    _schedule = WanDenoiser._schedule

    def _vae_factor(self) -> int:
        return int(self._pipe.vae_scale_factor)

    @property
    def resolution_multiple(self) -> int:
        return self.vae_factor * self.backbone.config.patch_size

    def _native_size(self) -> tuple[int, int]:
        side = self.backbone.config.sample_size * self.vae_factor
        return side, side

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        uncond = [is_unconditional(p) for p in prompts]
        groups = [[i for i, u in enumerate(uncond) if u == flag] for flag in (False, True)]
        parts = [self._encode_group([str(prompts[i]) for i in g], unconditional=flag)
                 for g, flag in zip(groups, (False, True)) if g]
        order = torch.argsort(torch.tensor(groups[0] + groups[1]))  # rows back in the prompts' order
        return DiffusersCond(torch.cat([c.embeds for c in parts])[order], mask=torch.cat([c.mask for c in parts])[order])

    def _encode_group(self, prompts: list[str], unconditional: bool) -> DiffusersCond:
        pipe = self._pipe
        if unconditional:  # the pipeline's negative prompt: no instruction, no token selection
            embeds, mask = pipe._get_gemma_prompt_embeds(prompt=prompts, device=self.device, dtype=self.compute_dtype,
                                                         max_sequence_length=self.max_sequence_length,
                                                         complex_human_instruction=False)
        else:
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                                    max_sequence_length=self.max_sequence_length,
                                                    complex_human_instruction=_instruction(pipe))
        return DiffusersCond(embeds, mask=mask)

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        scale = float(self.backbone.config.get("timestep_scale", 1.0))
        return {"hidden_states": x, "encoder_hidden_states": self._cast(cond.embeds),
                "encoder_attention_mask": cond.mask, "timestep": self._timestep(t) * scale}

    def _output(self, out: Tensor, x: Tensor) -> Tensor:
        return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * x.shape[1] else out  # a learned variance is dropped


def _instruction(pipe) -> list[str]:
    """The pipeline's default ``complex_human_instruction`` (a default argument of its ``__call__``)."""
    import inspect

    return inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
