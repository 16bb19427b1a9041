"""Diffusion-DPO on inverted trajectories: InPO, SmPO and Inversion-DPO.

Diffusion-DPO stands in for the intractable posterior ``p(x_{1:T} | x_0)`` of a pair's images by
random forward noising ``x_t = alpha x_0 + sigma e``. These methods instead take ``x_t`` from the
model's own deterministic **DDIM inversion** of ``x_0`` (``core.inversion``) -- the latent the model
would have denoised into that image -- and train Diffusion-DPO's loss (``algorithms/preference.py``)
at that ``x_t`` with the noise it implies, ``e = (x_t - alpha x_0) / sigma``. Winner and loser share
``t``; each has its own inverted latent.

- **InPO** (Lu et al. 2025, "InPO: Inversion Preference Optimization with Reparametrized DDIM for
  Efficient Diffusion Model Alignment"): DDIM inversion of each image to a random ``t`` by the
  current model (no gradient), conditional, in ``inversion_steps`` equal steps; the implicit reward
  of any latent through the reparametrised DDIM step is Diffusion-DPO's error difference there.
- **SmPO** (Lu et al. 2025, "Smoothed Preference Optimization via ReNoise Inversion for Aligning
  Diffusion Models with Varied Human Preferences"): the inversion is ReNoise (Garibi et al. 2024;
  ``renoise_steps`` refinements per step) and the binary label is replaced by a smoothed
  preference ``p = sigmoid((r^w - r^l) / tau)`` from a reward model's scores ``r`` (the training
  reward; pairs from a file are scored with it): the margin is multiplied by ``kappa (2 p - 1)``,
  so a pair the reward sees as similar contributes almost nothing and one it ranks the other way
  round pushes the other way (the authors: PickScore scores min-max normalised to [0, 1], ``tau = 1``,
  ``kappa = 10``).
- **Inversion-DPO** (2025, "Inversion-DPO: Precise and Efficient Post-Training for
  Diffusion Models"): the inversion is done once per epoch with the frozen *reference* model on a
  fixed grid of ``inversion_steps`` steps from 0 to ``t_max``, and ``t`` is drawn from that grid, so
  the trajectory of every image is exact for the reference and costs nothing per update.

``t`` is drawn as in Diffusion-DPO (``timestep_sampling``; VP models on their training steps).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..config import check_choice, check_positive, check_range
from ..core.inversion import ddim_inversion
from ..core.parametrization import broadcast_to, cond_index
from ..core.prompts import negative_prompts
from ._policy_gradient import _unwrap, model_prediction_type, model_schedule
from ._rollout import safe_reward
from .preference import DPO_WEIGHT, DiffusionDPO, DPOConfig, PairBatch, PairMicroBatch

INVERSION_MODELS = ("policy", "reference")


def smoothed_preference_weight(r_w: Tensor, r_l: Tensor, temperature: float, scale: float) -> Tensor:
    """SmPO's factor on the DPO margin: ``kappa (2 sigmoid((r^w - r^l) / tau) - 1)``, in ``(-kappa, kappa)``."""
    return scale * (2 * torch.sigmoid((r_w - r_l) / temperature) - 1)


def implied_noise(x0: Tensor, x_t: Tensor, t: Tensor, schedule: Any) -> Tensor:
    """``e = (x_t - alpha x_0) / sigma``: the noise under which forward noising of ``x_0`` gives ``x_t``."""
    alpha, sigma = schedule.alpha_sigma(t.double())
    alpha, sigma = broadcast_to(alpha.float(), x0), broadcast_to(sigma.float(), x0)
    return (x_t.float() - alpha * x0.float()) / sigma.clamp_min(1e-6)


@dataclass
class InversionDPOConfig(DPOConfig):
    inversion_model: str = "policy"  # policy: the current model inverts (InPO, SmPO); reference: the frozen base, once per epoch
    inversion_steps: int = 4  # DDIM inversion steps from 0 to t (policy) or over the fixed grid (reference)
    renoise_steps: int = 0  # ReNoise refinements per inversion step (SmPO: 1); 0 = plain DDIM inversion
    inversion_guidance_scale: float = 1.0  # CFG scale of the inversion (1: conditional only)
    t_max: float = 1.0  # reference inversion: the grid runs from 0 to t_max
    smoothing: bool = False  # SmPO: weight each pair by kappa (2 p - 1), p from the training reward
    smoothing_temperature: float = 1.0  # tau of p = sigmoid((r^w - r^l) / tau); 1 suits rewards in [0, 1]
    smoothing_scale: float = 10.0  # kappa (the authors' 10)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("inversion_model", self.inversion_model, INVERSION_MODELS)
        check_positive("inversion_steps", self.inversion_steps, integer=True)
        check_range("renoise_steps", self.renoise_steps, 0, None, integer=True)
        check_range("inversion_guidance_scale", self.inversion_guidance_scale, 0, None)
        check_range("t_max", self.t_max, 0, 1, lo_open=True)
        check_positive("smoothing_temperature", self.smoothing_temperature)
        check_positive("smoothing_scale", self.smoothing_scale)
        if self.uncond_fraction > 0:
            raise ValueError(f"uncond_fraction={self.uncond_fraction}: inversion methods invert with the prompt; "
                             "prompt dropout is not supported (set it to 0)")


class InversionDPO(DiffusionDPO):
    """One class for the three methods; the presets set ``inversion_model``, ``renoise_steps`` and ``smoothing``."""

    name = "inpo"

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> PairBatch:
        cfg = self.cfg
        batch = super().collect(model, prompts, epoch=epoch, seed=seed)
        if cfg.smoothing and batch.rewards is None:  # pairs from a file: score them with the reward model
            scores, failed = safe_reward(self.reward, batch.images, batch.prompts)
            batch.rewards = scores.nan_to_num(0.0)
            batch.info["reward_failed"] = float(failed)
        if cfg.inversion_model == "reference" and len(batch.chosen):
            batch.inverted = self._invert_grid(model, batch)  # type: ignore[attr-defined]
        return batch

    def _grid(self) -> Tensor:
        return torch.linspace(0.0, self.cfg.t_max, self.cfg.inversion_steps + 1, dtype=torch.float64)

    def _invert(self, m, x0: Tensor, cond: Any, uncond: Any, grid: Tensor, trajectory: bool) -> Tensor:
        cfg = self.cfg
        return ddim_inversion(m, x0, cond, grid, schedule=model_schedule(m), prediction_type=model_prediction_type(m),
                              uncond=uncond, guidance_scale=cfg.inversion_guidance_scale,
                              renoise_steps=cfg.renoise_steps, return_trajectory=trajectory)

    def _conds(self, model, batch: PairBatch, idx: Tensor) -> tuple[Any, Any]:
        cond = cond_index(batch.cond, idx)
        if self.cfg.inversion_guidance_scale == 1.0:
            return cond, None
        uncond = (cond_index(batch.uncond, idx) if batch.uncond is not None
                  else _unwrap(model).encode_prompts(negative_prompts([batch.prompts[i] for i in idx.tolist()])))
        return cond, uncond

    @torch.no_grad()
    def _invert_grid(self, model, batch: PairBatch) -> Tensor:
        """Every paired sample inverted by the reference along the fixed grid: ``[N, K + 1, ...]``."""
        out = torch.zeros(len(batch), self.cfg.inversion_steps + 1, *batch.x0.shape[1:], device=batch.x0.device)
        idx = torch.cat([batch.chosen, batch.rejected])
        for sel in idx.split(2 * self.cfg.micro_batch_size):
            cond, uncond = self._conds(model, batch, sel)
            out[sel] = self.reference(lambda m: self._invert(m, batch.x0[sel], cond, uncond, self._grid(), True))
        return out

    def _inverted_micro(self, model, micro: PairMicroBatch) -> PairMicroBatch:
        """The micro-batch with ``x_t`` from inversion: its (possibly regridded) ``t`` and implied noise."""
        b, cfg = micro.batch, self.cfg
        x0, schedule = b.x0[micro.idx], model_schedule(model)
        if cfg.inversion_model == "reference":
            K = cfg.inversion_steps
            k = (micro.t / cfg.t_max * K).ceil().clamp(1, K).long()  # t moves to the grid point above it
            t = self._grid().to(micro.t)[k]
            x_t = b.inverted[micro.idx.to(b.inverted.device), k.to(b.inverted.device)]
        else:
            t = micro.t
            grid = t.double()[:, None] * torch.linspace(0, 1, cfg.inversion_steps + 1, dtype=torch.float64,
                                                        device=t.device)
            cond, uncond = self._conds(model, b, micro.idx)
            x_t = self._invert(model, x0, cond, uncond, grid, False)
        return replace(micro, t=t, noise=implied_noise(x0, x_t, t, schedule))

    def loss(self, model, micro: PairMicroBatch) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        micro = self._inverted_micro(model, micro)
        err_w, err_l = self.errors(model, micro).chunk(2)
        ref_w, ref_l = self.errors(model, micro, reference=True).chunk(2)
        inside = (err_w - ref_w) - (err_l - ref_l)
        stats = {}
        if cfg.smoothing:
            r = micro.batch.rewards.to(inside.device)[micro.idx]
            weight = smoothed_preference_weight(*r.chunk(2), cfg.smoothing_temperature, cfg.smoothing_scale)
            inside = inside * weight
            stats["pref_weight"] = weight.mean().item()
        margin = -cfg.beta * DPO_WEIGHT * inside
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        return loss, {"loss": loss.item(), "reward_margin": margin.mean().item(),
                      "implicit_acc": (margin > 0).float().mean().item(), "err_w": err_w.mean().item(),
                      "err_l": err_l.mean().item(), **stats}


PRESETS: dict[str, tuple[type, type, dict]] = {
    "inpo": (InversionDPOConfig, InversionDPO, {}),
    "smpo": (InversionDPOConfig, InversionDPO, {"renoise_steps": 1, "smoothing": True}),
    "inversion_dpo": (InversionDPOConfig, InversionDPO, {"inversion_model": "reference", "inversion_steps": 10}),
}
