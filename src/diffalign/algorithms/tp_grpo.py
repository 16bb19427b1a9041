"""TP-GRPO / TurningPoint-GRPO (Tong et al. 2026, "Alleviating Sparse Rewards by Modeling Step-Wise and
Long-Term Sampling Effects in Flow-Based GRPO").

Two changes to Flow-GRPO's credit, both from the rewards ``R_j`` of the clean images the latents
``x_{t_j}`` lead to (ODE completion, ``R_0`` the pure-ODE sample of the trajectory's noise,
``R_T = r(x_0)``; the machinery DenseGRPO uses, ``dense_grpo.IntermediateRewardGRPO``):

1. **step-wise incremental reward**: step ``j`` (``x_{t_j} -> x_{t_{j+1}}``) is credited with its
   own effect ``d_j = R_{j+1} - R_j`` instead of the outcome ``R_T``;
2. **turning points**: a step whose effect is long-term -- it flips the local reward trend
   (``sign d_j != sign d_{j-1}``; the first step has no trend before it), its new direction is the
   trajectory's overall trend (``sign d_j = sign(R_T - R_0)``), and the reward evolution after it
   keeps that direction (``R_T - R_{j+1}`` is zero or of the same sign) -- gets the aggregated
   long-term reward ``R_T - R_j`` (its own gain plus everything that followed) instead of ``d_j``.
   Detection uses signs only: no hyperparameter.

Each step's rewards are then normalised within the prompt's group at that step (per-timestep GRPO
advantages) and trained with Flow-GRPO's PPO objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ._rollout import Batch
from ._step_credit import step_group_advantages
from .dense_grpo import IntermediateRewardConfig, IntermediateRewardGRPO


@dataclass
class TPGRPOConfig(IntermediateRewardConfig):
    eta: float = 0.8  # the paper's SDE noise level
    window_size: int = 5  # SDE (and training) on the first 5 of 10 steps, as the paper's configs
    window_mode: str = "fixed"


def turning_point_rewards(R: Tensor) -> tuple[Tensor, Tensor]:
    """TP-GRPO's per-step rewards ``[N, T]`` and turning-point mask from latent rewards ``R`` ``[N, T+1]``."""
    d = R[:, 1:] - R[:, :-1]  # incremental rewards d_j
    long = R[:, -1:] - R[:, :-1]  # aggregated long-term rewards R_T - R_j
    after = R[:, -1:] - R[:, 1:]  # what follows step j: R_T - R_{j+1}
    trend = torch.sign(R[:, -1:] - R[:, :1])  # the trajectory's overall trend
    s = torch.sign(d)
    prev = torch.cat([-s[:, :1], s[:, :-1]], dim=1)  # the first step counts as a flip
    turning = (s != 0) & (s != prev) & (s == trend) & (torch.sign(after) * s >= 0)
    turning &= torch.isfinite(d) & torch.isfinite(long)
    return torch.where(turning, long, d), turning


class TPGRPO(IntermediateRewardGRPO):
    name = "tp_grpo"

    def scored_latents(self, stochastic: list[int]) -> list[int]:
        return sorted({0, *super().scored_latents(stochastic)})  # R_0 sets the overall trend

    def advantages(self, batch: Batch) -> Tensor:
        rewards, turning = turning_point_rewards(batch.step_rewards)
        steps = batch.sde_mask.nonzero().flatten()
        batch.info["turning_point_frac"] = turning[:, steps].float().mean().item() if len(steps) else 0.0
        return step_group_advantages(rewards, batch.group, std=self.cfg.std_normalize)


PRESETS: dict[str, dict] = {"tp_grpo": {}}
