"""G2RPO (Zhou et al. 2025, "G^2RPO: Granular GRPO for Precise Reward in Flow Models").

- **Singular Stochastic Sampling**: the ``G`` samples of a prompt follow one deterministic (ODE)
  anchor trajectory from the group's noise; at a step ``k`` each takes a single SDE step from the
  shared ``x_{t_k}`` (Flow-GRPO's sampler, noise level ``a``) and then continues by the ODE. The
  only randomness separating the group's images is the noise of that one step, so their reward
  differences are the reward of that SDE perturbation -- exact single-step attribution. Every epoch
  draws ``branches_per_epoch`` such steps ``k`` from ``branch_window``; each is a separate branch of
  every group and is trained with its own advantage (``A [N, T]``, nonzero at the ``k`` only).
- **Multi-Granularity Advantage Integration**: the continuation after the SDE step is integrated
  at several granularities -- every ``g``-th point of the sampling grid for each ``g`` in
  ``granularities`` (``g = 1`` the full grid, larger ``g`` coarser) -- giving one image and one
  reward ``R_{k,g}`` each; the advantages are normalised within the group per granularity and
  summed, ``A_k^i = sum_g (R_{k,g}^i - mean_group R_{k,g}) / std_group R_{k,g}``, which removes the
  bias of any single denoising granularity.

Cost per epoch: one anchor per prompt (``T`` evaluations), one SDE step per sample and branch,
and the completions (``sum_g ceil((T - k - 1) / g)`` evaluations per sample and branch); the run
logs ``sampling_evals_per_image`` and ``scored_per_image``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import check_range
from ..core.sampling import seeded_noise
from ._rollout import Batch, check_whole_groups, safe_reward, sample_rows
from ._step_credit import completion_grid, encode, ode_complete, step_group_advantages
from .grpo import GRPO, GRPOConfig


@dataclass
class G2RPOConfig(GRPOConfig):
    beta: float = 0.0  # KL coefficient (the paper trains without)
    branch_window: list = field(default_factory=lambda: [0, 4])  # [first, last] step k of the single SDE step
    branches_per_epoch: int = 2  # distinct steps k per epoch, each a branch of every group
    granularities: list = field(default_factory=lambda: [1, 2, 3])  # strides g of the ODE completions

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window_size:
            raise ValueError(f"window_size={self.window_size} does not apply to g2rpo: its single stochastic step "
                             "is drawn from branch_window; set window_size to 0")
        w = self.branch_window
        if (len(w) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in w)
                or not 0 <= w[0] <= w[1] < self.num_steps):
            raise ValueError(f"branch_window must be [first, last] step indices with 0 <= first <= last < "
                             f"num_steps={self.num_steps}, got {w!r}")
        check_range("branches_per_epoch", self.branches_per_epoch, 1, w[1] - w[0] + 1, integer=True)
        g = self.granularities
        if (not g or len(set(g)) != len(g)
                or not all(isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= self.num_steps for i in g)):
            raise ValueError(f"granularities must be distinct integer strides in [1, num_steps={self.num_steps}], "
                             f"got {g!r}")


def integrated_advantages(R: Tensor, group: Tensor, *, std: bool = True) -> Tensor:
    """G2RPO's ``A [N, T]`` from branch rewards ``R [N, T, n_g]`` (NaN where step ``k`` did not branch):
    group-normalised per step and granularity, summed over granularities."""
    return sum(step_group_advantages(R[:, :, i], group, std=std) for i in range(R.shape[2]))


class G2RPO(GRPO):
    name = "g2rpo"

    def branch_steps(self, seed: int) -> list[int]:
        lo, hi = self.cfg.branch_window
        gen = torch.Generator().manual_seed(seed)
        return sorted((lo + torch.randperm(hi - lo + 1, generator=gen)[:self.cfg.branches_per_epoch]).tolist())

    @torch.no_grad()
    def sample_batch(self, model, prompts: list[str], *, epoch: int, seed: int) -> Batch:
        cfg, G, T = self.cfg, self.cfg.group_size, self.cfg.num_steps
        K = self.branch_steps(seed)
        P, n = len(prompts), len(prompts) * G
        all_prompts = [p for p in prompts for _ in range(G)]
        own = self.shard.part(n)
        check_whole_groups(self.reward, own, G)
        own_groups = slice(own.start // G, (own.stop - 1) // G + 1)
        device = next(model.parameters()).device
        guided = cfg.guidance_scale != 1.0
        rows = torch.arange(own.start, own.stop)
        group = torch.arange(P).repeat_interleave(G)
        cond, uncond = encode(model, all_prompts[own], guided)
        g_cond, g_uncond = encode(model, prompts[own_groups], guided)
        noise = seeded_noise(model.sample_shape, [seed + g * G for g in range(own_groups.start, own_groups.stop)],
                             device)
        t = model.schedule.timesteps(T)
        kw = dict(sampler=cfg.sampler, guidance_scale=cfg.guidance_scale, batch_size=cfg.sample_batch_size)
        anchor, _, _, _ = sample_rows(model, P, own_groups, g_cond, g_uncond, noise, torch.Generator(device),
                                      timesteps=t, sde_steps=[], **kw)  # the deterministic anchor of each group
        anchor = anchor[(rows // G - own_groups.start).to(anchor.device)]
        next_latents, log_probs = torch.zeros_like(anchor[:, 1:]), torch.zeros(len(anchor), T)
        R = torch.full((len(anchor), T, len(cfg.granularities)), float("nan"))
        images, failed, evals = None, 0, P * T
        for k in K:
            x, lp, _, _ = sample_rows(model, n, own, cond, uncond, anchor[:, k],
                                      torch.Generator(device).manual_seed(seed + 1 + k), timesteps=t[k:k + 2],
                                      eta=cfg.eta, sde_steps=[0], **kw)  # the single stochastic step
            next_latents[:, k], log_probs[:, k] = x[:, 1], lp[:, 0]
            evals += n
            for i, g in enumerate(cfg.granularities):
                grid = completion_grid(t, k + 1, g)
                x0 = ode_complete(model, x[:, 1], grid, cond, uncond, **kw)
                decoded = model.decode(x0).float()
                R[:, k, i], bad = safe_reward(self.reward, decoded, all_prompts[own], group=group[own])
                failed, evals = failed + bad, evals + n * (len(grid) - 1)
                if images is None:
                    images, rewards = decoded.cpu(), R[:, k, i].clone()
        sde_mask = torch.zeros(T, dtype=torch.bool)
        sde_mask[K] = True
        batch = Batch(prompts=all_prompts[own], group=group[own], cond=cond,
                      uncond=uncond, latents=anchor, log_probs=log_probs, t=t, sde_mask=sde_mask, rewards=rewards,
                      advantages=torch.zeros_like(rewards), valid=~torch.isnan(rewards), images=images,
                      info={"reward_failed": float(failed)}, next_latents=next_latents, step_rewards=R)
        batch.info["scored_per_image"] = float(len(K) * len(cfg.granularities))
        batch.info["sampling_evals_per_image"] = evals / n
        return batch

    def advantages(self, batch: Batch) -> Tensor:
        return integrated_advantages(batch.step_rewards, batch.group, std=self.cfg.std_normalize)


PRESETS: dict[str, dict] = {"g2rpo": {}}
