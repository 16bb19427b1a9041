"""Online rollouts shared by every online method: group sampling, rewards, advantages.

``rollout`` samples ``G`` images per prompt with the policy's stochastic sampler, stores the
trajectories with their per-step log-probs, scores the images, and turns rewards into
advantages -- GRPO's per-group normalisation (Shao et al. 2024, "DeepSeekMath"; Flow-GRPO) or
DDPO's per-prompt statistics tracking (Black et al. 2023). A reward that returns NaN/inf or
raises drops the affected samples (they get zero advantage and are counted), so the update
stays finite and the run goes on.

In an N-process run (``Shard``) each process samples and scores its contiguous share of the
epoch's images, and the rewards are gathered before the advantages are computed, so a group
that straddles two processes is normalised exactly as in the one-process run.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Collection, Sequence

import numpy as np
import torch
from torch import Tensor

from ..core.parametrization import cond_cat, cond_index
from ..core.prompts import negative_prompts
from ..core.sampling import sample, seeded_noise
from ..worlds import shapes


@dataclass(frozen=True)
class Shard:
    """This process's share of an epoch in an N-process run: samples
    ``[rank * n / world, (rank + 1) * n / world)`` of a global batch of ``n``, and ``gather``, which
    concatenates a tensor (the same shape on every process) over processes in rank order.
    ``runtime.distributed.process_shard`` builds it; the default is the one-process run."""

    rank: int = 0
    world: int = 1
    gather: Callable[[Tensor], Tensor] | None = None

    def part(self, n: int) -> slice:
        if n % self.world:
            raise ValueError(f"a batch of {n} samples cannot be split evenly over {self.world} processes; "
                             f"use a batch size that is a multiple of {self.world}")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def all(self, t: Tensor) -> Tensor:
        """``t`` of every process, concatenated in rank order (``t`` itself in a one-process run)."""
        return t if self.world == 1 else self.gather(t)


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
    advantages: Tensor  # [N], or [N, T] per step (step-level credit); 0 where the reward failed
    valid: Tensor  # [N] bool, False where the reward failed
    images: Tensor  # [N, 3, H, W] in [0, 1]
    info: dict[str, float] = field(default_factory=dict)
    eta: Tensor | None = None  # [T] the noise level of each step, when it varies per step (None: the config's)
    next_latents: Tensor | None = None  # [N, T, ...] where step j's sample is not latents[:, j + 1] (G2RPO's branches)
    step_rewards: Tensor | None = None  # [N, ...] rewards of intermediate latents or branches (dense methods)

    def __len__(self) -> int:
        return len(self.prompts)

    # -- rows (sample idx[r], step j[r]) of the trajectories (what the policy-gradient losses read) --
    # ``j`` is a step for every row (an int) or one per row (a tensor [m]: timestep-fused rows).
    def transition(self, idx: Tensor, j: int | Tensor) -> tuple[Tensor, Tensor]:
        """``(x_{t_j}, x_{t_{j+1}})`` of rows ``(idx, j)``."""
        x_prev = self.latents[idx, j + 1] if self.next_latents is None else self.next_latents[idx, j]
        return self.latents[idx, j], x_prev

    def advantage(self, idx: Tensor, j: int | Tensor) -> Tensor:
        """The advantage of rows ``(idx, j)``: per sample, or per (sample, step)."""
        return self.advantages[idx] if self.advantages.ndim == 1 else self.advantages[idx, j]

    def step_eta(self, j: int | Tensor, default: float) -> float | Tensor:
        """The noise level the sampler used at step ``j``: ``default`` when it is the same at every
        step, else ``eta[j]`` (a tensor [m] for rows of several steps)."""
        if self.eta is None:
            return default
        return self.eta[j] if isinstance(j, Tensor) else float(self.eta[j])


def check_group_batching(group_size: int, batch_size: int, steps_per_epoch: int) -> None:
    """The rollout geometry every online method shares: full groups of >= 2 images per prompt and
    optimiser steps that split the batch evenly."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (advantages compare samples of one prompt), got {group_size}")
    if batch_size % group_size:
        raise ValueError(f"batch_size={batch_size} must be a multiple of group_size={group_size} "
                         "(every prompt gets a full group)")
    if batch_size % steps_per_epoch:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} must divide batch_size={batch_size}")


def safe_reward(reward: Callable, images: Tensor, prompts: list[str], group: Tensor | None = None) -> tuple[Tensor, int]:
    """Call the reward; return ``(rewards with NaN where it failed, number failed)``.

    A reward that raises is retried sample by sample so that one bad sample costs one sample.
    A group-wise reward (``reward.groupwise``) gets the group ids and is retried group by group.
    """
    if getattr(reward, "groupwise", False):
        return _safe_group_reward(reward, images, prompts, group)
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


def _safe_group_reward(reward: Callable, images: Tensor, prompts: list[str], group: Tensor | None) -> tuple[Tensor, int]:
    """``safe_reward`` for a reward that scores whole groups: it sees every group whole."""
    ids = group if group is not None else torch.tensor([prompts.index(p) for p in prompts])
    try:
        r = torch.as_tensor(reward(images, prompts, group=ids), dtype=torch.float32).flatten().cpu()
        if r.shape[0] != len(prompts):
            raise ValueError(f"reward returned {r.shape[0]} values for {len(prompts)} images")
    except Exception:
        r = torch.full((len(prompts),), float("nan"))
        for g in ids.unique():
            idx = torch.nonzero(ids == g).flatten()
            try:
                r[idx] = torch.as_tensor(reward(images[idx], [prompts[i] for i in idx.tolist()], group=ids[idx]),
                                         dtype=torch.float32).flatten().cpu()
            except Exception:
                pass
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


def informative_samples(batch: Batch) -> Tensor:
    """``[N]`` bool: the valid samples of groups whose valid rewards are not all equal (DAPO, Yu et al. 2025,
    "dynamic sampling": a group of equal rewards has zero advantage everywhere, so DiffusionNFT trains its
    samples at r = 1/2 and AWM gives them no weight)."""
    group, rewards, valid = batch.group.cpu(), batch.rewards.cpu(), batch.valid.cpu()
    keep = torch.zeros(len(batch), dtype=torch.bool)
    for g in group.unique():
        idx = (group == g) & valid
        r = rewards[idx]
        if len(r) > 1 and bool((r != r[0]).any()):
            keep |= idx
    return keep


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


class _OwnRows:
    """The policy evaluated on some rows of a rollout chunk only: the rows this process owns.

    A stochastic step draws its noise for the whole chunk from one generator. To sample exactly the
    images of the one-process run, every process replays each chunk's draws and runs the model on
    its own rows; the other rows get a zero prediction and are dropped afterwards."""

    def __init__(self, model, rows: Tensor, size: int, cond: Any, uncond: Any):
        self.model, self.rows, self.size, self.cond, self.uncond = model, rows, size, cond, uncond
        self.prediction_type, self.schedule = model.prediction_type, model.schedule

    def __call__(self, x_t: Tensor, t: Tensor, _placeholder: Any) -> Tensor:
        if len(self.rows) == 0:
            return torch.zeros_like(x_t)
        if x_t.shape[0] == 2 * self.size:  # both guidance branches in one batch (`guided_prediction`)
            rows, cond = torch.cat([self.rows, self.rows + self.size]), cond_cat(self.cond, self.uncond)
        else:
            rows, cond = self.rows, self.cond
        pred = self.model(x_t[rows], t[rows], cond)
        out = x_t.new_zeros(x_t.shape, dtype=pred.dtype)
        out[rows] = pred
        return out


def _own_chunk(model, chunk: slice, own: slice, cond: Any, uncond: Any, noise: Tensor):
    """``(policy, cond, uncond, initial noise, kept rows)`` that sample the rollout's ``chunk`` on a
    process that owns samples ``own`` (its ``cond``, ``uncond`` and ``noise`` hold those rows only)."""
    lo, hi = max(chunk.start, own.start), min(chunk.stop, own.stop)
    rows = torch.arange(lo - chunk.start, hi - chunk.start) if hi > lo else torch.zeros(0, dtype=torch.long)
    mine = slice(lo - own.start, hi - own.start) if hi > lo else slice(0, 0)
    size = chunk.stop - chunk.start
    x1 = noise.new_zeros((size, *noise.shape[1:]))
    x1[rows] = noise[mine]
    policy = _OwnRows(model, rows.to(noise.device), size, cond_index(cond, mine),
                      None if uncond is None else cond_index(uncond, mine))
    placeholder = torch.zeros(size, device=noise.device)  # the real conditioning lives in the policy
    return policy, placeholder, None if uncond is None else placeholder, x1, rows


def check_whole_groups(reward: Callable, own: slice, group_size: int) -> None:
    """A group-wise reward must see whole groups: refuse a process share that cuts one."""
    if getattr(reward, "groupwise", False) and (own.start % group_size or own.stop % group_size):
        raise ValueError(f"reward {getattr(reward, 'name', reward)!r} scores whole groups, but this process holds "
                         f"samples {own.start}..{own.stop - 1} of groups of {group_size}; make each process's share "
                         "of algorithm.batch_size a multiple of group_size")


@torch.no_grad()
def rollout(model, prompts: list[str], reward: Callable, *, group_size: int, sampler: str, num_steps: int,
            eta: float | Sequence[float] | None, guidance_scale: float, sde_steps: Collection[int] | None, seed: int,
            batch_size: int = 64, clip_sample: float = 0.0, shared_noise: bool = False,
            shard: Shard = Shard()) -> Batch:
    """Sample ``group_size`` trajectories per prompt, score them, and store everything PPO needs.

    Noise for image ``i`` comes from seed ``seed + i``; the SDE noise from ``seed``, so a rollout is a
    pure function of the model weights and ``seed`` (exact resume). ``shared_noise``: every
    trajectory of a group starts from the group's first noise, so they differ only by the
    sampler's per-step noise (D3PO's pairs, Yang et al. 2024). With the ``shard`` of an N-process
    run the batch holds this process's samples only: rows ``shard.part(n)`` of the one-process
    rollout, equal to them up to float rounding.
    """
    all_prompts = [p for p in prompts for _ in range(group_size)]
    group = torch.arange(len(prompts)).repeat_interleave(group_size)
    n = len(all_prompts)
    own = shard.part(n)
    check_whole_groups(reward, own, group_size)
    device = next(model.parameters()).device
    cond = model.encode_prompts(all_prompts[own])
    uncond = model.encode_prompts(negative_prompts(all_prompts[own])) if guidance_scale != 1.0 else None
    first = [seed + (i // group_size) * group_size if shared_noise else seed + i for i in range(n)]
    noise = seeded_noise(model.sample_shape, first[own], device)
    gen = torch.Generator(device).manual_seed(seed)
    latents, log_probs, t, sde_mask = sample_rows(
        model, n, own, cond, uncond, noise, gen, batch_size=batch_size, sampler=sampler, num_steps=num_steps,
        guidance_scale=guidance_scale, eta=eta, sde_steps=sde_steps, clip_sample=clip_sample)
    images = model.decode(latents[:, -1]).float()
    rewards, n_failed = safe_reward(reward, images, all_prompts[own], group=group[own])
    valid = ~torch.isnan(rewards)
    return Batch(prompts=all_prompts[own], group=group[own], cond=cond, uncond=uncond, latents=latents,
                 log_probs=log_probs, t=t, sde_mask=sde_mask,
                 rewards=rewards, advantages=torch.zeros_like(rewards), valid=valid, images=images.cpu(),
                 info={"reward_failed": float(n_failed)},
                 eta=None if isinstance(eta, (int, float)) or eta is None else torch.as_tensor(eta).float())


@torch.no_grad()
def sample_rows(model, n: int, own: slice, cond: Any, uncond: Any, x_start: Tensor, generator: torch.Generator, *,
                batch_size: int = 64, **sample_kw) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample rows ``own`` of a global batch of ``n`` trajectories in chunks of ``batch_size``, all
    stochastic draws from ``generator``: ``(latents [own, S+1, ...], log_probs [own, S], t [S+1],
    sde_mask [S])``. ``cond``, ``uncond`` and ``x_start`` (the latents at the grid's first time) hold
    rows ``own`` only; a process that owns part of a chunk replays the chunk's draws (``_own_chunk``), so
    its rows equal those of the one-process call. ``sample_kw`` go to ``core.sampling.sample``."""
    latents, log_probs = [], []
    for i in range(0, n, batch_size):
        sl = slice(i, min(i + batch_size, n))
        if own.start == 0 and own.stop == n:
            policy, c, u, x1, keep = (model, cond_index(cond, sl), None if uncond is None else cond_index(uncond, sl),
                                      x_start[sl], slice(None))
        else:
            policy, c, u, x1, keep = _own_chunk(model, sl, own, cond, uncond, x_start)
        traj = sample(policy, c, noise=x1, uncond=u, return_trajectory=True, generator=generator, **sample_kw)
        latents.append(traj.latents[keep])
        log_probs.append(traj.log_probs[keep])
    return torch.cat(latents), torch.cat(log_probs), traj.t, traj.sde_mask


def gathered(batch: Batch, prompts: list[str], shard: Shard) -> Batch:
    """The epoch's rewards as one batch: ``batch`` (this process's samples) with its reward fields
    -- prompts, group ids, rewards, validity -- gathered over processes in rank order, so that
    per-group (GRPO) and per-prompt (DDPO) statistics see every sample of a group wherever it was
    sampled. ``prompts`` are the epoch's prompts (the group ids index them). ``step_rewards`` (dense
    methods) are gathered too. The other fields stay this process's own: use the result for statistics
    only."""
    if shard.world == 1:
        return batch
    group, rewards = shard.all(batch.group), shard.all(batch.rewards)
    valid = ~torch.isnan(rewards)
    step_rewards = None if batch.step_rewards is None else shard.all(batch.step_rewards)
    return replace(batch, prompts=[prompts[int(g)] for g in group], group=group, rewards=rewards, valid=valid,
                   advantages=torch.zeros_like(rewards), info={"reward_failed": float((~valid).sum())},
                   step_rewards=step_rewards)


def reward_stats(batch: Batch) -> dict[str, float]:
    r = batch.rewards[batch.valid]
    if len(r) == 0:
        return {"reward_mean": float("nan"), "reward_std": float("nan")}
    groups = [batch.rewards[(batch.group == g) & batch.valid] for g in batch.group.unique()]
    zero_std = np.mean([float(len(x) > 1 and x.std() == 0) for x in groups])
    return {"reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item(),
            "frac_zero_std_groups": float(zero_std)}


def render_latents(model, prompts: Sequence[str], seed: int, device: torch.device | str, *, what: str) -> Tensor:
    """The shapes world's renders of ``prompts`` (seeded like ``shapes.render_batch``), encoded by the
    model (``model.encode_images``): a regulariser's data (ReFL / DPOK's pretraining loss). Other
    prompts are refused with ``what`` (the setting that asked for renders and how to turn it off)."""
    bad = [p for p in prompts if not shapes.is_prompt(p)]
    if bad:
        raise ValueError(what.format(prompt=repr(bad[0])))
    images, _ = shapes.render_batch(list(prompts), seed=seed)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).to(device)
    return model.encode_images(pixels)
