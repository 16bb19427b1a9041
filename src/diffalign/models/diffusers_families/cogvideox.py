"""CogVideoX (Yang et al. 2024, "CogVideoX: Text-to-Video Diffusion Models with An Expert
Transformer"): a video DiT on VP diffusion with v-prediction, zero terminal SNR and an SNR shift --
the epsilon / v path that DDPO and Diffusion-DPO take on video."""

from __future__ import annotations

from torch import Tensor

from ..diffusers_options import DiffusersCond
from ._video import VideoDenoiser


class CogVideoXDenoiser(VideoDenoiser):
    """``CogVideoXPipeline`` (CogVideoX 1.0 2B / 5B; 1.5 when the latent frame count is a multiple of
    its temporal patch). T5 embeddings (226 tokens), the discrete VP timestep ``k = t T - 1``,
    ``VPSchedule`` with the scheduler's ``snr_shift_scale`` and ``rescale_betas_zero_snr`` (the
    CogVideoX DDIM / DPM schedulers' ``alphas_cumprod``), ``v_prediction``. The pipeline's latents
    are ``[F', C, H, W]``; ``sample_shape`` is ``[C, F', H, W]`` like every video family, transposed
    inside ``forward``. Rotary embeddings (5B) come from the pipeline's own function."""

    default_fps = 8.0

    def _check_options(self) -> None:
        super()._check_options()
        p_t = self.backbone.config.get("patch_size_t")
        if p_t and self.latent_frames % p_t:
            raise ValueError(f"num_frames={self.num_frames} gives {self.latent_frames} latent frames, not a multiple "
                             f"of the transformer's temporal patch {p_t} (CogVideoX 1.5 would pad them)")

    @property
    def default_frames(self) -> int:
        return int(self.backbone.config.sample_frames)

    @property
    def default_size(self) -> tuple[int, int]:
        c = self.backbone.config
        return c.sample_height * self.vae_factor, c.sample_width * self.vae_factor

    @property
    def resolution_multiple(self) -> int:
        return self.vae_factor * self.backbone.config.patch_size

    def _schedule(self):
        return self._vp_schedule(dict(self._pipe.scheduler.config))

    def _vp_extras(self, cfg: dict) -> dict:
        cogvideo = str(cfg.get("_class_name", "")).startswith("CogVideoX")
        return {"snr_shift_scale": float(cfg.get("snr_shift_scale", 3.0)) if cogvideo else 1.0,
                "zero_terminal_snr": bool(cfg.get("rescale_betas_zero_snr", False))}

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        embeds, _ = self._pipe.encode_prompt(prompt=[str(p) for p in prompts], do_classifier_free_guidance=False,
                                             num_videos_per_prompt=1, max_sequence_length=self.max_sequence_length,
                                             device=self.device)
        return DiffusersCond(embeds)

    def _rotary(self, frames: int, device) -> tuple[Tensor, Tensor] | None:
        if not self.backbone.config.use_rotary_positional_embeddings:
            return None
        key = ("rope", frames, self.height, self.width, device)
        if key not in self._ids_cache:
            self._ids_cache[key] = self._pipe._prepare_rotary_positional_embeddings(self.height, self.width, frames,
                                                                                     device)
        return self._ids_cache[key]

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        return {"hidden_states": x.transpose(1, 2), "encoder_hidden_states": self._cast(cond.embeds),
                "timestep": self._vp_timestep(t), "image_rotary_emb": self._rotary(x.shape[2], x.device)}

    def _output(self, out: Tensor, x: Tensor) -> Tensor:
        return out.transpose(1, 2)
