"""The policy-gradient core shared by Flow-GRPO / DanceGRPO / MixGRPO (``grpo.py``) and DDPO
(``ddpo.py``): re-scoring stored trajectory steps under the current policy, the PPO clipped
objective (Schulman et al. 2017) or REINFORCE, and the closed-form KL between the Gaussian steps
of the policy and of the reference model (Flow-GRPO Eq. 12; DPOK, Fan et al. 2023).

Each method file only says how it samples, which steps it trains on and how it turns rewards
into advantages.

**Timestep fusion.** Given the stored trajectory, the loss terms of different timesteps are
independent, so the update runs over *rows* ``(sample i, step j)`` -- each with its own ``t_j``,
stored ``x_{t_j}``, ``x_{t_{j+1}}`` and old log-prob -- and one forward/backward may span several
timesteps. ``micro_batch_size`` bounds the rows of one pass (the memory option); the gradient is
the mean over every row of the optimiser step whatever the split, equal to per-timestep
accumulation up to float rounding (``tests/test_fused_update.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ..config import check_choice, check_positive, check_range
from ..core.parametrization import cond_index, guided_prediction
from ..core.steps import SAMPLERS, StepOutput, get_step
from ._rollout import Batch, Shard, check_group_batching, gathered, reward_stats, rollout


@dataclass
class PolicyGradientConfig:
    group_size: int = 8  # G: images per prompt
    batch_size: int = 64  # images per rollout (batch_size / G prompts per epoch)
    sampler: str = "flow_sde"  # stochastic sampler of the policy
    eta: float = 0.7  # its noise level (flow_sde: a; dance_sde: eta; ddim: eta)
    num_steps: int = 10  # T: sampling steps
    guidance_scale: float = 3.0  # CFG scale used by the policy (sampling and training)
    loss: str = "ppo"  # "ppo" (clipped ratio) or "reinforce" (score function, DDPO-SF)
    clip_range: float = 1e-3  # epsilon of PPO's clip
    adv_clip_max: float = 5.0  # advantages are clipped to [-A, A]
    beta: float = 0.0  # KL(policy || reference) coefficient
    timestep_fraction: float = 1.0  # share of the stochastic steps trained on per epoch
    timestep_choice: str = "random"  # which of them: random (Flow-GRPO, DDPO) | noisiest (the first, where layout is decided)
    inner_epochs: int = 1  # PPO passes over each rollout batch
    sample_batch_size: int = 64  # images per sampling pass of the rollout (CFG doubles the backbone batch)
    micro_batch_size: int = 32  # rows (sample x trained timestep) per forward pass; CFG doubles the backbone batch
    steps_per_epoch: int = 1  # optimiser steps per pass (the batch is split into this many chunks)
    clip_sample: float = 0.0  # ddim only: clamp the predicted x0 (pixel-space epsilon models); 0 = off

    def __post_init__(self) -> None:
        for name in ("group_size", "batch_size", "num_steps", "inner_epochs", "sample_batch_size",
                     "micro_batch_size", "steps_per_epoch"):
            check_positive(name, getattr(self, name), integer=True)
        check_choice("sampler", self.sampler, [s for s in SAMPLERS if s != "flow_ode"])
        check_choice("loss", self.loss, ["ppo", "reinforce"])
        check_range("eta", self.eta, 0, 2)
        check_range("guidance_scale", self.guidance_scale, 0, None)
        check_positive("clip_range", self.clip_range)
        check_positive("adv_clip_max", self.adv_clip_max)
        check_range("beta", self.beta, 0, None)
        check_range("timestep_fraction", self.timestep_fraction, 0, 1, lo_open=True)
        check_choice("timestep_choice", self.timestep_choice, ["random", "noisiest"])
        check_range("clip_sample", self.clip_sample, 0, None)
        if self.clip_sample and self.sampler != "ddim":
            raise ValueError(f"clip_sample applies to the 'ddim' sampler only, got sampler {self.sampler!r}")
        check_group_batching(self.group_size, self.batch_size, self.steps_per_epoch)

    @property
    def prompts_per_epoch(self) -> int:
        return self.batch_size // self.group_size


@dataclass
class Rescored:
    """Stored transitions ``x_t -> x_prev`` of some rows ``(sample, step)`` and the policy's steps there."""

    step: StepOutput | None
    x_t: Tensor
    x_prev: Tensor
    t: Tensor  # [m] float64: each row's t_j
    t_prev: Tensor  # [m] t_{j+1}
    t_batch: Tensor  # [m] float32 times, the model's input
    cond: Any
    uncond: Any
    eta: float | Tensor  # the sampler's noise level: one for every row, or [m] per row (per-step levels)


@dataclass
class MicroBatch:
    """Rows of a rollout ``Batch``: sample ``idx[r]`` at trajectory step ``steps[r]``
    (``x_{t_j} -> x_{t_{j+1}}``); the rows may span several steps (timestep fusion)."""

    batch: Batch
    idx: Tensor  # [m] sample indices into the Batch
    steps: Tensor  # [m] trajectory step j of each row
    share: float = 1.0  # N-process run: the fraction of the one-process micro-batch's rows these are
    weight: float = 1.0  # rows of the one-process micro-batch * k / rows of the optimiser step (1: equal split)


def gaussian_kl(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """``KL(N(mean, std^2) || N(mean_ref, std^2))`` averaged over non-batch dims (shared std); 0 where
    ``std == 0`` (a deterministic step is no policy step: its log-prob is 0 too)."""
    std = std.expand_as(mean).float()
    kl = (mean.float() - mean_ref.float()) ** 2 / (2 * std.clamp_min(1e-12) ** 2)
    kl = torch.where(std > 0, kl, torch.zeros_like(kl))
    return kl.mean(dim=tuple(range(1, mean.ndim)))


def ppo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate ``max(-A r, -A clip(r, 1-eps, 1+eps))`` with ``r = exp(log p - log p_old)``."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():  # 0-d tensors: read once per epoch (no device sync per micro-batch)
        stats = {"clip_frac": ((ratio - 1).abs() > clip_range).float().mean(),
                 "approx_kl": (0.5 * (log_prob - old_log_prob) ** 2).mean(),
                 "ratio_mean": ratio.mean()}
    return loss, stats


def reinforce_loss(log_prob: Tensor, advantages: Tensor) -> Tensor:
    """Score-function estimator (DDPO-SF): ``-A * log p``."""
    return -(advantages * log_prob).mean()


class OnlinePolicyGradient:
    """``collect`` samples and scores; ``minibatches`` plans the update; ``loss`` scores one micro-batch of rows.

    In an N-process run the runtime sets ``shard``: each process samples its share of the epoch's
    images, advantages are computed on the gathered rewards, and ``minibatches`` plans the
    one-process update and keeps this process's part of every micro-batch (``MicroBatch.share``).
    """

    name = "policy_gradient"
    shard: Shard = Shard()
    samples_with_policy = True  # rollouts run the trained weights without gradient (LoRA may be merged)

    def __init__(self, cfg: PolicyGradientConfig, *, reward: Callable, reference: Callable | None = None):
        if cfg.beta > 0 and reference is None:
            raise ValueError(f"beta={cfg.beta} needs a reference model")
        self.cfg, self.reward, self.reference = cfg, reward, reference
        self.step_fn = get_step(cfg.sampler)
        self.step_kw = {"clip_sample": cfg.clip_sample} if cfg.clip_sample else {}

    # -- hooks for the method files -----------------------------------------------------------
    def sde_steps(self, epoch: int, generator: torch.Generator) -> list[int] | None:
        return None

    def advantages(self, batch: Batch) -> Tensor:
        """Advantages of the gathered batch: ``[N]`` (one per trajectory) or ``[N, T]`` (one per step)."""
        raise NotImplementedError

    def sample_batch(self, model, prompts: list[str], *, epoch: int, seed: int) -> Batch:
        """This process's rollouts of the epoch (methods that branch or score intermediate latents
        override it)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(seed)
        return rollout(model, prompts, self.reward, group_size=cfg.group_size, sampler=cfg.sampler,
                       num_steps=cfg.num_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
                       sde_steps=self.sde_steps(epoch, gen), seed=seed, batch_size=cfg.sample_batch_size,
                       shard=self.shard, **self.step_kw)

    # -- the Algorithm protocol ---------------------------------------------------------------
    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> Batch:
        cfg = self.cfg
        batch = self.sample_batch(model, prompts, epoch=epoch, seed=seed)
        full = gathered(batch, prompts, self.shard)  # every process computes the same statistics
        adv = self.advantages(full)  # [N], or [N, T] for step-level credit
        valid = full.valid if adv.ndim == 1 else full.valid[:, None]
        adv = torch.where(valid, adv, torch.zeros_like(adv)).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        batch.advantages = adv[self.shard.part(len(full))]
        batch.info.update(full.info)
        batch.info.update(reward_stats(full))
        return batch

    def train_steps(self, batch: Batch, generator: torch.Generator) -> list[int]:
        """The stochastic steps trained on this epoch: a ``timestep_fraction`` of them, drawn at random
        (``timestep_choice: random``) or the noisiest ones (``noisiest``: the first steps of the
        trajectory, where a layout is decided; the generator is advanced alike, so the rest of a run
        draws the same numbers under either choice)."""
        steps = [j for j in range(len(batch.sde_mask)) if batch.sde_mask[j]]
        if not steps:
            raise ValueError(f"{self.name}: no stochastic step to train on (sampler {self.cfg.sampler!r}, eta "
                             f"{self.cfg.eta}); the policy has no log-probs")
        k = max(1, round(self.cfg.timestep_fraction * len(steps)))
        order = torch.randperm(len(steps), generator=generator)[:k].sort().values
        if self.cfg.timestep_choice == "noisiest":
            return steps[:k]
        return [steps[i] for i in order]

    def minibatches(self, batch: Batch, generator: torch.Generator) -> Iterator[list[MicroBatch]]:
        """One list of micro-batches per optimiser step: each step covers a chunk of samples on every
        trained timestep (the gradient is the mean over those rows, as in Flow-GRPO and DDPO).

        Rows are ordered step by step (the chunk at the first trained step, then at the next, ...)
        and cut into ``ceil(rows / micro_batch_size)`` near-equal micro-batches, so
        ``micro_batch_size`` = chunk size gives one micro-batch per timestep and
        ``micro_batch_size`` >= chunk x steps a single fused pass."""
        cfg, shard = self.cfg, self.shard
        n = len(batch) * shard.world
        perm = torch.randperm(n, generator=generator)
        steps = torch.tensor(self.train_steps(batch, generator), dtype=torch.long)
        own = shard.part(n)
        for chunk in perm.chunk(cfg.steps_per_epoch):
            idx, step = chunk.repeat(len(steps)), steps.repeat_interleave(len(chunk))
            parts = torch.arange(len(idx)).tensor_split(math.ceil(len(idx) / cfg.micro_batch_size))
            yield [self._own_part(batch, idx[p], step[p], own, weight=len(p) * len(parts) / len(idx))
                   for p in parts]

    def _own_part(self, batch: Batch, idx: Tensor, steps: Tensor, own: slice, weight: float = 1.0) -> MicroBatch:
        """This process's part of the one-process micro-batch of rows ``(idx, steps)`` (global sample
        indices). Every process runs every micro-batch, so a process that holds none of its rows
        runs one row of its own with ``share`` 0 (data-parallel training needs the same backward
        passes everywhere)."""
        if self.shard.world == 1:
            return MicroBatch(batch, idx, steps, weight=weight)
        mine = (idx >= own.start) & (idx < own.stop)
        if not mine.any():
            return MicroBatch(batch, idx.new_zeros(1), steps[:1], share=0.0, weight=weight)
        return MicroBatch(batch, idx[mine] - own.start, steps[mine], share=int(mine.sum()) / len(idx), weight=weight)

    def rescore(self, model, micro: MicroBatch) -> Rescored:
        """The current policy's Gaussian steps at the micro-batch's stored transitions, one row per
        ``(sample, step)``: each row its own ``t_j``, ``t_{j+1}`` and noise level."""
        cfg, batch, idx, j = self.cfg, micro.batch, micro.idx, micro.steps
        x_t, x_prev = batch.transition(idx, j)
        t, t_prev = batch.t[j].to(x_t.device), batch.t[j + 1].to(x_t.device)  # [m] float64: one t per row
        t_batch = t.float()
        cond = cond_index(batch.cond, idx)
        uncond = None if batch.uncond is None else cond_index(batch.uncond, idx)
        r = Rescored(None, x_t, x_prev, t, t_prev, t_batch, cond, uncond, batch.step_eta(j, cfg.eta))
        r.step = self._step(model, r, guided_prediction(model, x_t, t_batch, cond, uncond, cfg.guidance_scale))
        return r

    def reference_step(self, model, r: Rescored) -> StepOutput:
        """The reference model's Gaussian steps at the same transitions (no gradient)."""
        with torch.no_grad():
            out = self.reference(lambda m: guided_prediction(m, r.x_t, r.t_batch, r.cond, r.uncond,
                                                             self.cfg.guidance_scale))
            return self._step(model, r, out)

    def _step(self, model, r: Rescored, out: Tensor) -> StepOutput:
        eta = r.eta.to(r.t.device) if isinstance(r.eta, Tensor) else r.eta
        return self.step_fn(r.x_t, out, r.t, r.t_prev, eta=eta, prev_sample=r.x_prev, schedule=model_schedule(model),
                            prediction_type=model_prediction_type(model), **self.step_kw)

    def loss(self, model, micro: MicroBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean loss of the micro-batch's rows (times ``micro.weight``); statistics are detached
        0-d tensors."""
        cfg, batch, idx, j = self.cfg, micro.batch, micro.idx, micro.steps
        r = self.rescore(model, micro)
        step = r.step
        adv = batch.advantage(idx, j).to(step.log_prob.device)
        if cfg.loss == "ppo":
            loss, stats = ppo_loss(step.log_prob, batch.log_probs[idx, j].to(step.log_prob.device), adv, cfg.clip_range)
        else:
            loss, stats = reinforce_loss(step.log_prob, adv), {}
        stats["policy_loss"] = loss.detach()
        loss = self.add_kl(model, r, loss, stats)
        stats["loss"] = loss.detach()
        return loss * micro.weight, stats

    def add_kl(self, model, r: Rescored, loss: Tensor, stats: dict[str, Tensor]) -> Tensor:
        """``loss + beta KL(p_theta || p_ref)`` at the rescored rows (``loss`` itself when ``beta = 0``)."""
        if self.cfg.beta == 0:
            return loss
        kl = gaussian_kl(r.step.mean, self.reference_step(model, r).mean, r.step.std).mean()
        stats["kl"] = kl.detach()
        return loss + self.cfg.beta * kl


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)  # DDP / accelerate wrappers


def model_schedule(model: Any):
    return _unwrap(model).schedule


def model_prediction_type(model: Any) -> str:
    return _unwrap(model).prediction_type
