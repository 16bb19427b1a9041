"""Z-Image (Z-Image Team 2025, "Z-Image: An Efficient Image Generation Foundation Model with
Single-Stream Diffusion Transformer"): a single-stream DiT on rectified flow with a Qwen3 text
encoder."""

from __future__ import annotations

import torch
from torch import Tensor

from ..diffusers_adapter import DiffusersDenoiser
from ..diffusers_options import DiffusersCond


class ZImageDenoiser(DiffusersDenoiser):
    """``ZImagePipeline``. Text: Qwen3's penultimate hidden states behind its chat template, one
    unpadded tensor per prompt (kept so, padded per batch under a mask and unpadded again for the
    transformer). The transformer takes a list of ``[C, 1, H, W]`` latents and the time
    ``1 - sigma``, and predicts ``x0 - eps``: the pipeline negates it, so the flow prediction is
    minus the output. The pipeline's guidance ``pos + s (pos - neg)`` is diffalign's CFG with
    ``guidance_scale = s + 1`` (Z-Image-Turbo samples with ``s = 0``: ``guidance_scale`` 1).
    Schedule: the config's shift (dynamic: ``mu`` at the adapter's resolution) on the pipeline's
    ``linspace(1, 1/N, N)`` grid; the FLUX VAE's ``scaling_factor`` and ``shift_factor``."""

    ragged_text = True

    def _vae_factor(self) -> int:
        return int(self._pipe.vae_scale_factor)

    def _native_size(self) -> tuple[int, int]:
        return 1024, 1024

    @property
    def resolution_multiple(self) -> int:
        return self.vae_factor * self.backbone.config.all_patch_size[0]

    def _schedule(self):
        h, w = self.latent_size
        return self._flow_schedule(dict(self._pipe.scheduler.config), seq_len=(h // 2) * (w // 2), sigma_min=0.0)

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        rows, _ = self._pipe.encode_prompt(prompt=[str(p) for p in prompts], device=self.device,
                                           do_classifier_free_guidance=False,
                                           max_sequence_length=self.max_sequence_length)
        n = max(r.shape[0] for r in rows)
        embeds = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, n - r.shape[0])) for r in rows])
        mask = torch.stack([torch.arange(n, device=embeds.device) < r.shape[0] for r in rows]).long()
        return DiffusersCond(embeds, mask=mask)

    def _timestep(self, t: Tensor) -> Tensor:
        return 1 - t.float()

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        embeds = self._cast(cond.embeds)
        lengths = cond.mask.sum(1).tolist()
        return {"x": list(x[:, :, None].unbind(0)), "t": self._timestep(t).to(x.dtype),
                "cap_feats": [e[: int(n)] for e, n in zip(embeds, lengths)]}

    def _output(self, out: list[Tensor], x: Tensor) -> Tensor:
        return -torch.stack(out)[:, :, 0]
