"""DenseGRPO (Deng et al. 2026, Tongyi Lab, "DenseGRPO: From Sparse to Dense Reward for Flow Matching
Model Alignment"): a reward for every denoising step instead of the trajectory's final reward.

In the paper's notation, a trajectory ``x_T -> ... -> x_0`` of the SDE sampler (here ``x_{t_0} = x_1``
noise ``-> x_{t_T} = x_0``, step ``j`` is ``x_{t_j} -> x_{t_{j+1}}``):

- **intermediate clean images**: each latent ``x_{t_j}`` is taken to a clean image ``x0_hat_j`` --
  by the deterministic ODE from ``t_j`` to 0 (the paper's choice; ``intermediate_reward: ode``,
  optionally on every ``completion_stride``-th grid point) or by the one-step Tweedie estimate
  (``tweedie``: one model call per latent) -- and scored, ``R_j = r(x0_hat_j, c)``, ``R_T = r(x_0, c)``;
- **dense reward**: the step's reward gain ``Delta R_j = R_{j+1} - R_j`` is its reward, and its
  advantage is ``Delta R_j`` normalised within the prompt's group *at that step*,
  ``A_j^i = (Delta R_j^i - mean_k Delta R_j^k) / std_k Delta R_j^k``; the PPO-clipped objective of
  Flow-GRPO then trains step ``j`` with ``A_j`` instead of one trajectory-wide advantage;
- **exploration calibration**: with dense rewards one sees per step whether the injected noise helps
  or hurts. The SDE noise level ``a`` of Flow-GRPO's sampler (``sigma_t = a sqrt(t / (1 - t))``)
  becomes a per-step ``a_j``: after every epoch, step ``j``'s level is lowered by the factor
  ``1 - calibration_rate`` when the share ``p_j`` of positive reward gains among the nonzero ones is
  below ``1/2 - calibration_tolerance`` (the perturbation mostly destroys reward: exploration too
  wide), raised by ``1 + calibration_rate`` while ``p_j`` stays within the tolerance of ``1/2`` (the
  perturbation explores without destroying), and kept otherwise; clamped to ``[eta_min, eta_max]``.
  This rule is diffalign's reading of the paper's reward-aware scheme (adjust a timestep-specific
  stochasticity until the exploration space suits every timestep). The levels are part of the
  algorithm state, so ``--resume`` continues with them.

Cost: an ODE completion from ``x_{t_j}`` takes ``T - j`` model evaluations, ``T (T + 1) / 2`` per
trajectory for all ``T`` steps (55 extra at ``T = 10``, where sampling took 10); Tweedie takes ``T``.
Every run logs ``scored_per_image`` (images the reward scored per trajectory) and
``sampling_evals_per_image`` (model evaluations per trajectory, completions included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import check_choice, check_positive, check_range
from ._rollout import Batch, rollout
from ._step_credit import INTERMEDIATE_REWARDS, completion_evals, latent_rewards, step_group_advantages
from .grpo import GRPO, GRPOConfig


@dataclass
class IntermediateRewardConfig(GRPOConfig):
    """Flow-GRPO's settings plus how intermediate latents are scored (DenseGRPO, TP-GRPO)."""

    beta: float = 0.0  # KL coefficient (the dense methods train without it by default)
    intermediate_reward: str = "ode"  # R_j of x_{t_j}: ode (deterministic completion) | tweedie (one-step x0_hat)
    completion_stride: int = 1  # ODE completion on every k-th point of the sampling grid (fewer evaluations)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("intermediate_reward", self.intermediate_reward, list(INTERMEDIATE_REWARDS))
        check_range("completion_stride", self.completion_stride, 1, self.num_steps, integer=True)


@dataclass
class DenseGRPOConfig(IntermediateRewardConfig):
    calibrate_noise: bool = True  # DenseGRPO's reward-aware per-step calibration of the SDE noise level a_j
    calibration_rate: float = 0.05  # relative change of a_j per epoch
    calibration_tolerance: float = 0.1  # delta: step j is balanced when |p_j - 1/2| <= delta
    eta_min: float = 0.1  # a_j stays in [eta_min, eta_max]
    eta_max: float = 1.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("calibration_rate", self.calibration_rate, 0, 1, hi_open=True)
        check_range("calibration_tolerance", self.calibration_tolerance, 0, 0.5)
        check_positive("eta_min", self.eta_min)
        check_range("eta_max", self.eta_max, self.eta_min, 2)
        if self.calibrate_noise:
            check_range("eta", self.eta, self.eta_min, self.eta_max)


def reward_gains(R: Tensor) -> Tensor:
    """DenseGRPO's dense reward ``Delta R_j = R_{j+1} - R_j`` ``[N, T]`` from latent rewards ``R`` ``[N, T+1]``."""
    return R[:, 1:] - R[:, :-1]


def calibrate_eta(etas: list[float], gains: Tensor, steps: list[int], *, rate: float, tolerance: float,
                  lo: float, hi: float) -> list[float]:
    """One calibration update of the per-step noise levels from the epoch's reward gains ``[N, T]``."""
    out = list(etas)
    for j in steps:
        g = gains[:, j]
        g = g[torch.isfinite(g) & (g != 0)]
        if len(g) == 0:
            continue
        p = (g > 0).float().mean().item()
        if p < 0.5 - tolerance:
            out[j] = max(lo, etas[j] * (1 - rate))
        elif p <= 0.5 + tolerance:
            out[j] = min(hi, etas[j] * (1 + rate))
    return out


class IntermediateRewardGRPO(GRPO):
    """GRPO rollouts whose latents are scored (``latent_rewards``); subclasses turn ``R`` into advantages."""

    def step_etas(self) -> float | list[float]:
        return self.cfg.eta

    def scored_latents(self, stochastic: list[int]) -> list[int]:
        """The latents ``j`` whose ``R_j`` the advantages need: both ends of every stochastic step."""
        return sorted({j for s in stochastic for j in (s, s + 1)})

    def sample_batch(self, model, prompts: list[str], *, epoch: int, seed: int) -> Batch:
        cfg = self.cfg
        sde = self.sde_steps(epoch, torch.Generator().manual_seed(seed))
        batch = rollout(model, prompts, self.reward, group_size=cfg.group_size, sampler=cfg.sampler,
                        num_steps=cfg.num_steps, eta=self.step_etas(), guidance_scale=cfg.guidance_scale,
                        sde_steps=sde, seed=seed, batch_size=cfg.sample_batch_size, shard=self.shard,
                        **self.step_kw)
        needed = self.scored_latents([j for j in range(cfg.num_steps) if batch.sde_mask[j]])
        batch.step_rewards, scored = latent_rewards(
            model, batch, self.reward, mode=cfg.intermediate_reward, sampler=cfg.sampler,
            guidance_scale=cfg.guidance_scale, steps=needed, stride=cfg.completion_stride,
            batch_size=cfg.sample_batch_size, **self.step_kw)
        batch.info["scored_per_image"] = 1 + scored / len(batch)
        batch.info["sampling_evals_per_image"] = float(
            cfg.num_steps + completion_evals(cfg.num_steps, needed, cfg.intermediate_reward, cfg.completion_stride))
        return batch


class DenseGRPO(IntermediateRewardGRPO):
    name = "dense_grpo"

    def __init__(self, cfg: DenseGRPOConfig, **kw):
        super().__init__(cfg, **kw)
        self.etas = [cfg.eta] * cfg.num_steps

    def step_etas(self) -> float | list[float]:
        return list(self.etas) if self.cfg.calibrate_noise else self.cfg.eta

    def advantages(self, batch: Batch) -> Tensor:
        cfg = self.cfg
        gains = reward_gains(batch.step_rewards)
        if cfg.calibrate_noise:  # on the gathered batch: every process makes the same update
            steps = [j for j in range(cfg.num_steps) if batch.sde_mask[j]]
            self.etas = calibrate_eta(self.etas, gains, steps, rate=cfg.calibration_rate,
                                      tolerance=cfg.calibration_tolerance, lo=cfg.eta_min, hi=cfg.eta_max)
            batch.info["eta_min_step"], batch.info["eta_max_step"] = min(self.etas), max(self.etas)
        finite = gains[torch.isfinite(gains)]
        batch.info["dense_gain_mean"] = finite.mean().item() if len(finite) else 0.0
        return step_group_advantages(gains, batch.group, std=cfg.std_normalize)

    def state_dict(self) -> dict:
        return {"etas": list(self.etas)}

    def load_state_dict(self, state: dict) -> None:
        self.etas = list(state["etas"])


PRESETS: dict[str, dict] = {"dense_grpo": {}, "dense_grpo_tweedie": {"intermediate_reward": "tweedie"}}
