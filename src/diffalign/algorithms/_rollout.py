"""Online rollouts shared by every online method: group sampling, rewards, advantages.

``rollout`` samples ``G`` images per prompt with the policy's stochastic sampler, stores the
trajectories with their per-step log-probs, scores the images, and turns rewards into
advantages -- GRPO's per-group normalisation (Shao et al. 2024, "DeepSeekMath"; Flow-GRPO) or
DDPO's per-prompt statistics tracking (Black et al. 2023). A reward that returns NaN/inf or
raises drops the affected samples (they get zero advantage and are counted), so the update
stays finite and the run goes on.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Collection

import numpy as np
import torch
from torch import Tensor

from ..core.sampling import sample, seeded_noise


@dataclass
class Batch:
    """One epoch's worth of on-policy experience (``N = prompts * G`` samples)."""

    prompts: list[str]  # [N], each prompt repeated G times, groups contiguous
    group: Tensor  # [N] group id (index of the prompt in the epoch)
    cond: Any  # encoded prompts, batched like the samples
    uncond: Any  # encoded empty prompt (None without guidance)
    latents: Tensor  # [N, T+1, ...] trajectory from noise to sample
    log_probs: Tensor  # [N, T] log-prob of each step under the sampling policy
    t: Tensor  # [T+1] time grid
    sde_mask: Tensor  # [T] which steps were stochastic
    rewards: Tensor  # [N] (NaN where the reward failed)
    advantages: Tensor  # [N] (0 where the reward failed)
    valid: Tensor  # [N] bool, False where the reward failed
    images: Tensor  # [N, 3, H, W] in [0, 1]
    info: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


def safe_reward(reward: Callable, images: Tensor, prompts: list[str]) -> tuple[Tensor, int]:
    """Call the reward; return ``(rewards with NaN where it failed, number failed)``.

    A reward that raises is retried sample by sample so that one bad sample costs one sample.
    """
    try:
        r = torch.as_tensor(reward(images, prompts), dtype=torch.float32).flatten().cpu()
        if r.shape[0] != len(prompts):
            raise ValueError(f"reward returned {r.shape[0]} values for {len(prompts)} images")
    except Exception:
        r = torch.empty(len(prompts))
        for i in range(len(prompts)):
            try:
                r[i] = float(torch.as_tensor(reward(images[i:i + 1], prompts[i:i + 1])).flatten()[0])
            except Exception:
                r[i] = float("nan")
    r = torch.where(torch.isfinite(r), r, torch.full_like(r, float("nan")))
    return r, int(torch.isnan(r).sum())


def group_advantages(rewards: Tensor, group: Tensor, *, std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO: ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``, ignoring NaN rewards.

    ``std=False`` only centres (Dr. GRPO). Failed samples get advantage 0.
    """
    adv = torch.zeros_like(rewards)
    for g in group.unique():
        idx = (group == g) & ~torch.isnan(rewards)
        if idx.sum() == 0:
            continue
        r = rewards[idx]
        centred = r - r.mean()
        adv[idx] = centred / (r.std(unbiased=False) + eps) if std else centred
    return adv


class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation: each prompt's rewards are normalised by the mean and
    std of the last ``buffer_size`` rewards seen for that prompt, once ``min_count`` are there;
    before that, by the statistics of the whole batch (Black et al. 2023, Appendix)."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = defaultdict(lambda: deque(maxlen=buffer_size))

    def update(self, prompts: list[str], rewards: Tensor, eps: float = 1e-6) -> Tensor:
        rewards = rewards.float()
        ok = ~torch.isnan(rewards)
        adv = torch.zeros_like(rewards)
        if ok.sum() == 0:
            return adv
        batch_mean, batch_std = rewards[ok].mean(), rewards[ok].std(unbiased=False)
        by_prompt: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            if ok[i]:
                by_prompt[p].append(i)
        for p, idx in by_prompt.items():
            self.stats[p].extend(rewards[idx].tolist())
            hist = torch.tensor(list(self.stats[p]))
            if len(hist) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = hist.mean(), hist.std(unbiased=False)
            adv[idx] = (rewards[idx] - mean) / (std + eps)
        return adv

    def state_dict(self) -> dict:
        return {p: list(v) for p, v in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats.clear()
        for p, v in state.items():
            self.stats[p].extend(v)


@torch.no_grad()
def rollout(model, prompts: list[str], reward: Callable, *, group_size: int, sampler: str, num_steps: int,
            eta: float | None, guidance_scale: float, sde_steps: Collection[int] | None, seed: int,
            batch_size: int = 64, clip_sample: float = 0.0) -> Batch:
    """Sample ``group_size`` trajectories per prompt, score them, and store everything PPO needs.

    Noise for image ``i`` comes from seed ``seed + i``; the SDE noise from ``seed``, so a rollout is a
    pure function of the model weights and ``seed`` (exact resume).
    """
    all_prompts = [p for p in prompts for _ in range(group_size)]
    group = torch.arange(len(prompts)).repeat_interleave(group_size)
    device = next(model.parameters()).device
    cond = model.encode_prompts(all_prompts)
    uncond = model.encode_prompts([""] * len(all_prompts)) if guidance_scale != 1.0 else None
    noise = seeded_noise(model.sample_shape, [seed + i for i in range(len(all_prompts))], device)
    gen = torch.Generator(device).manual_seed(seed)
    from ..core.parametrization import cond_index

    parts = []
    for i in range(0, len(all_prompts), batch_size):
        sl = slice(i, i + batch_size)
        parts.append(sample(model, cond_index(cond, sl), sampler=sampler, num_steps=num_steps,
                            guidance_scale=guidance_scale, noise=noise[sl],
                            uncond=None if uncond is None else cond_index(uncond, sl), eta=eta,
                            sde_steps=sde_steps, return_trajectory=True, generator=gen, clip_sample=clip_sample))
    latents = torch.cat([p.latents for p in parts])
    images = model.decode(latents[:, -1]).float()
    rewards, n_failed = safe_reward(reward, images, all_prompts)
    valid = ~torch.isnan(rewards)
    return Batch(prompts=all_prompts, group=group, cond=cond, uncond=uncond, latents=latents,
                 log_probs=torch.cat([p.log_probs for p in parts]), t=parts[0].t, sde_mask=parts[0].sde_mask,
                 rewards=rewards, advantages=torch.zeros_like(rewards), valid=valid, images=images.cpu(),
                 info={"reward_failed": float(n_failed)})


def reward_stats(batch: Batch) -> dict[str, float]:
    r = batch.rewards[batch.valid]
    if len(r) == 0:
        return {"reward_mean": float("nan"), "reward_std": float("nan")}
    groups = [batch.rewards[(batch.group == g) & batch.valid] for g in batch.group.unique()]
    zero_std = np.mean([float(len(x) > 1 and x.std() == 0) for x in groups])
    return {"reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item(),
            "frac_zero_std_groups": float(zero_std)}
