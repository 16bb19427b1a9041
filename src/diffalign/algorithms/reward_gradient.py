"""Reward-gradient fine-tuning: backpropagate a differentiable reward through the sampler.

All variants share one differentiable sampling path (:meth:`RewardGradient.chain`, which calls
``core.sampling.sample`` with ``grad=`` the steps to backpropagate through and ``checkpoint=``
to recompute their model calls in the backward pass, so memory grows with the number of grad
steps ``K``, not with the chain length ``T``) and one single-step prediction
(:func:`one_step_x0` / :meth:`RewardGradient.last_step`):

- **DRaFT** (Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable
  Rewards"): maximise ``r(x_0)`` by backpropagating through the whole sampling chain
  (``truncation: 0``).
- **DRaFT-K**: stop the gradient before the last ``K`` steps (``truncation: K``); the paper's
  best setting is ``K = 1``.
- **DRaFT-LV**: ``K = 1`` with lower variance: the final sample (no gradient) is re-noised to
  the last step's noise level ``n`` times (``lv_samples: n``), each copy is denoised by one step
  with gradient, and the rewards are averaged.
- **AlignProp** (Prabhudesai et al. 2023, "Aligning Text-to-Image Diffusion Models with Reward
  Backpropagation"): randomised truncated backpropagation, ``K ~ U{k_min .. k_max}`` drawn per
  optimiser step, with gradient checkpointing.
- **ReFL** (Xu et al. 2023, "ImageReward", Reward Feedback Learning): sample without gradient to
  a random step ``j`` of a late interval ``refl_interval``, predict ``x_0`` in one step from
  ``x_{t_j}`` with gradient, score it, and regularise with the pretraining (denoising) loss
  (``beta``) on data (``pretrain_data``).

The loss of every variant is ``-reward_scale * mean r + beta * L_pretrain``; ``beta`` also makes
the runtime build the reference model that ``pretrain_data: reference`` samples from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..config import check_choice, check_positive, check_range
from ..core.parametrization import (
    cond_cat,
    cond_index,
    from_x0_eps,
    guided_prediction,
    to_x0_eps,
)
from ..core.prompts import negative_prompts
from ..core.sampling import Trajectory, sample, seeded_noise
from ..core.steps import SAMPLERS, get_step
from ._policy_gradient import _unwrap
from ._rollout import render_latents

MODES = ("draft", "alignprop", "refl")


def reward_name(reward: Any) -> str:
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__)


def require_differentiable(method: str, reward: Any) -> None:
    """Reward-gradient methods backpropagate through the reward: refuse one that declares no gradient."""
    if not getattr(reward, "differentiable", False):
        raise ValueError(f"method {method!r} backpropagates through the reward, but reward {reward_name(reward)!r} "
                         "is not differentiable (its `differentiable` attribute is not True); use a differentiable "
                         "reward (e.g. shapes_soft, clipscore, pickscore) or an RL method (flow_grpo, ddpo)")


def check_batching(cfg: Any) -> None:
    """The batching fields the reward-gradient configs share (positive sizes that fit together)."""
    for name in ("batch_size", "micro_batch_size", "steps_per_epoch", "inner_epochs", "num_steps"):
        check_positive(name, getattr(cfg, name), integer=True)
    check_range("guidance_scale", cfg.guidance_scale, 0, None)
    if cfg.micro_batch_size > cfg.batch_size:
        raise ValueError(f"micro_batch_size={cfg.micro_batch_size} must be <= batch_size={cfg.batch_size}")
    if cfg.batch_size < cfg.steps_per_epoch:
        raise ValueError(f"steps_per_epoch={cfg.steps_per_epoch} must be <= batch_size={cfg.batch_size}")


@dataclass
class RewardGradientConfig:
    mode: str = "draft"  # draft (DRaFT, DRaFT-K, DRaFT-LV) | alignprop | refl
    batch_size: int = 16  # prompts (one image each) per epoch
    micro_batch_size: int = 8  # images per differentiable chain
    steps_per_epoch: int = 1  # optimiser steps per epoch (the batch is split into this many chunks)
    inner_epochs: int = 1  # passes over each epoch's prompts and noise
    sampler: str = "flow_ode"  # sampler of the chain (deterministic by default, as in DRaFT)
    eta: float = 0.0  # its noise level (stochastic samplers are reparametrised: noise is fixed per image)
    num_steps: int = 10  # T: sampling steps
    guidance_scale: float = 3.0  # CFG scale of the chain
    truncation: int = 0  # K (draft): backpropagate through the last K steps only; 0 = the full chain
    lv_samples: int = 0  # n of DRaFT-LV (needs truncation = 1); 0 = off
    k_min: int = 1  # AlignProp: K ~ U{k_min .. k_max} per optimiser step
    k_max: int = 0  # 0 = num_steps
    refl_interval: list = field(default_factory=list)  # ReFL: [first, last] step index j; [] = last quarter
    reward_scale: float = 1.0  # multiplier of the reward in the loss (ReFL's lambda)
    beta: float = 0.0  # weight of the pretraining (denoising) loss regulariser (ReFL)
    pretrain_data: str = "world"  # regulariser data: world (shapes renderer) | reference (base-model samples)
    checkpoint: bool = True  # recompute the chain's model calls in the backward pass
    clip_sample: float = 0.0  # ddim only: clamp the predicted x0 (pixel-space epsilon models); 0 = off

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_batching(self)
        check_choice("sampler", self.sampler, list(SAMPLERS))
        check_range("eta", self.eta, 0, 2)
        check_range("truncation", self.truncation, 0, self.num_steps, integer=True)
        check_range("lv_samples", self.lv_samples, 0, None, integer=True)
        if self.lv_samples and (self.mode != "draft" or self.truncation != 1):
            raise ValueError(f"lv_samples={self.lv_samples} (DRaFT-LV) needs mode 'draft' with truncation 1, "
                             f"got mode {self.mode!r}, truncation {self.truncation}")
        if self.truncation and self.mode != "draft":
            raise ValueError(f"truncation={self.truncation} applies to mode 'draft' only (alignprop draws K from "
                             f"[k_min, k_max]; refl takes one step), got mode {self.mode!r}")
        check_range("k_max", self.k_max, 0, self.num_steps, integer=True)
        check_range("k_min", self.k_min, 1, self.k_max or self.num_steps, integer=True)
        if self.refl_interval:
            iv = self.refl_interval
            if (len(iv) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in iv)
                    or not 0 <= iv[0] <= iv[1] < self.num_steps):
                raise ValueError(f"refl_interval must be [first, last] step indices with 0 <= first <= last < "
                                 f"num_steps={self.num_steps}, got {iv!r}")
        check_positive("reward_scale", self.reward_scale)
        check_range("beta", self.beta, 0, None)
        check_choice("pretrain_data", self.pretrain_data, ["world", "reference"])
        check_range("clip_sample", self.clip_sample, 0, None)
        if self.clip_sample and self.sampler != "ddim":
            raise ValueError(f"clip_sample applies to the 'ddim' sampler only, got sampler {self.sampler!r}")

    @property
    def prompts_per_epoch(self) -> int:
        return self.batch_size

    @property
    def refl_steps(self) -> tuple[int, int]:
        """ReFL's interval of ``j`` (inclusive); ImageReward trains on the last quarter of the chain."""
        if self.refl_interval:
            return int(self.refl_interval[0]), int(self.refl_interval[1])
        return min(self.num_steps - 1, (3 * self.num_steps) // 4), self.num_steps - 1


PRESETS: dict[str, dict] = {
    "draft": {},
    "draft_k": {"truncation": 1},
    "draft_lv": {"truncation": 1, "lv_samples": 2},
    "alignprop": {"mode": "alignprop"},
    "refl": {"mode": "refl", "beta": 1.0},
}


def method_name(cfg: RewardGradientConfig) -> str:
    if cfg.mode != "draft":
        return cfg.mode
    return "draft_lv" if cfg.lv_samples else ("draft_k" if cfg.truncation else "draft")


@dataclass
class GradientBatch:
    """One epoch of prompts and starting noise; ``loss`` records the final samples it produced."""

    prompts: list[str]
    cond: Any
    uncond: Any  # None without guidance
    noise: Tensor  # [N, *sample_shape] x_1 of each chain
    seed: int  # the epoch's seed (stochastic samplers, DRaFT-LV's noise)
    data: Tensor | None = None  # [N, *sample_shape] x_0 for the pretraining-loss regulariser
    images: Tensor | None = None  # [N, 3, H, W] final samples (for held-out rewards), filled by ``loss``
    rewards: Tensor | None = None  # [N] their rewards (NaN until seen)

    def __len__(self) -> int:
        return len(self.prompts)

    def record(self, idx: Tensor, images: Tensor, rewards: Tensor) -> None:
        images, rewards = images.detach().float().cpu(), rewards.detach().float().cpu()
        if self.images is None:
            self.images = torch.zeros(len(self), *images.shape[1:])
            self.rewards = torch.full((len(self),), float("nan"))
        self.images[idx], self.rewards[idx] = images, rewards

    @property
    def info(self) -> dict[str, float]:
        r = self.rewards[~torch.isnan(self.rewards)] if self.rewards is not None else torch.zeros(0)
        if len(r) == 0:
            return {"reward_mean": float("nan"), "reward_std": float("nan")}
        return {"reward_mean": r.mean().item(), "reward_std": r.std(unbiased=False).item()}


@dataclass
class GradientMicroBatch:
    batch: GradientBatch
    idx: Tensor  # sample indices into the batch
    grad_steps: list[int]  # chain steps the gradient flows through (draft / alignprop)
    refl_step: int = -1  # ReFL's step j


def one_step_x0(model: Any, x_t: Tensor, t: Tensor, cond: Any, uncond: Any = None, guidance_scale: float = 1.0,
                *, schedule: Any = None, prediction_type: str | None = None) -> Tensor:
    """ReFL's one-step prediction of ``x_0`` from ``x_t`` at scalar time ``t`` (with gradient):
    the guided model output converted by ``core.parametrization.to_x0_eps``."""
    inner = _unwrap(model)
    schedule, prediction_type = schedule or inner.schedule, prediction_type or inner.prediction_type
    t = torch.as_tensor(t, dtype=torch.float64)
    out = guided_prediction(model, x_t, t.to(x_t.device, torch.float32).expand(x_t.shape[0]), cond, uncond,
                            guidance_scale)
    alpha, sigma = schedule.alpha_sigma(t)
    return to_x0_eps(out, x_t, alpha.float(), sigma.float(), prediction_type)[0]


def denoising_loss(model: Any, x0: Tensor, cond: Any, generator: torch.Generator) -> Tensor:
    """The pretraining objective used as ReFL's regulariser: the mean squared error between the
    model output at a uniform random time and its target (``from_x0_eps`` of the true ``x0, eps``)."""
    inner = _unwrap(model)
    u = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    alpha, sigma = (v.to(x0).view(-1, *[1] * (x0.ndim - 1)) for v in inner.schedule.alpha_sigma(u))
    x_t = alpha * x0 + sigma * eps
    pred = model(x_t, u.to(x0), cond)
    return (pred.float() - from_x0_eps(x0, eps, alpha, sigma, inner.prediction_type).float()).pow(2).mean()


class RewardGradient:
    """``collect`` draws noise (and regulariser data); ``loss`` runs the differentiable chain."""

    def __init__(self, cfg: RewardGradientConfig, *, reward: Callable, reference: Callable | None = None):
        self.cfg, self.reward, self.reference = cfg, reward, reference
        self.name = method_name(cfg)
        require_differentiable(self.name, reward)
        if cfg.beta > 0 and cfg.pretrain_data == "reference" and reference is None:
            raise ValueError(f"{self.name}: pretrain_data 'reference' needs a reference model (the runtime builds "
                             "one when beta > 0)")
        self.step_kw = {"clip_sample": cfg.clip_sample} if cfg.clip_sample else {}

    # -- the Algorithm protocol ---------------------------------------------------------------
    @torch.no_grad()
    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> GradientBatch:
        cfg, m = self.cfg, _unwrap(model)
        device = next(m.parameters()).device
        cond = m.encode_prompts(list(prompts))
        uncond = m.encode_prompts(negative_prompts(prompts)) if cfg.guidance_scale != 1.0 else None
        noise = seeded_noise(m.sample_shape, [seed + i for i in range(len(prompts))], device)
        batch = GradientBatch(list(prompts), cond, uncond, noise, seed)
        if cfg.beta > 0:
            batch.data = self.pretrain_data(m, batch)
        return batch

    def pretrain_data(self, m, batch: GradientBatch) -> Tensor:
        """``x_0`` for the regulariser: the shapes renderer's images of the prompts, or base-model samples."""
        if self.cfg.pretrain_data == "world":
            what = (f"{self.name}: pretrain_data 'world' renders shapes-world prompts only, got {{prompt}}; "
                    "use pretrain_data 'reference' for other prompts")
            return render_latents(m, batch.prompts, batch.seed, batch.noise.device, what=what)
        data_noise = seeded_noise(m.sample_shape, [batch.seed + len(batch) + i for i in range(len(batch))],
                                  batch.noise.device)
        return self.reference(lambda ref: self.run_chain(ref, batch.cond, batch.uncond, data_noise, False,
                                                         seed=batch.seed).x0)

    def minibatches(self, batch: GradientBatch, generator: torch.Generator) -> Iterator[list[GradientMicroBatch]]:
        cfg, T = self.cfg, self.cfg.num_steps
        perm = torch.randperm(len(batch), generator=generator)
        for chunk in perm.chunk(cfg.steps_per_epoch):
            if cfg.mode == "alignprop":  # one truncation per optimiser step
                k = int(torch.randint(cfg.k_min, (cfg.k_max or T) + 1, (1,), generator=generator))
            else:
                k = cfg.truncation or T
            lo, hi = cfg.refl_steps
            yield [GradientMicroBatch(batch, idx, list(range(T - k, T)),
                                      int(torch.randint(lo, hi + 1, (1,), generator=generator)) if cfg.mode == "refl"
                                      else -1)
                   for idx in chunk.split(cfg.micro_batch_size)]

    def loss(self, model, micro: GradientMicroBatch) -> tuple[Tensor, dict[str, float]]:
        cfg, batch, idx = self.cfg, micro.batch, micro.idx
        m = _unwrap(model)
        cond = cond_index(batch.cond, idx)
        uncond = None if batch.uncond is None else cond_index(batch.uncond, idx)
        prompts = [batch.prompts[i] for i in idx.tolist()]
        seed = batch.seed + int(idx[0])
        stats: dict[str, float] = {}
        if cfg.mode == "refl":
            traj = self.run_chain(model, cond, uncond, batch.noise[idx], False, seed=seed, return_trajectory=True)
            j = micro.refl_step
            x_j = traj.latents[:, j]
            x0 = one_step_x0(model, x_j, traj.t[j], cond, uncond, cfg.guidance_scale)
            final, stats["refl_t"] = traj.x0, float(traj.t[j])
        elif cfg.lv_samples:
            final = self.run_chain(model, cond, uncond, batch.noise[idx], False, seed=seed).x0
            x0 = self.last_step(model, final, cond, uncond, seed)
        else:
            x0 = final = self.run_chain(model, cond, uncond, batch.noise[idx], micro.grad_steps, seed=seed).x0
            stats["truncation"] = float(len(micro.grad_steps))
        images = m.decode(x0)
        n_copies = images.shape[0] // len(prompts)
        r = self.reward(images, prompts * n_copies)
        loss = -cfg.reward_scale * r.mean()
        with torch.no_grad():
            final_images = images[:len(prompts)] if final is x0 else m.decode(final)
            final_r = r[:len(prompts)] if final is x0 else self.reward(final_images, prompts)
        batch.record(idx, final_images, final_r)
        stats["reward_grad"] = r.mean().item()
        if cfg.beta > 0:
            gen = torch.Generator().manual_seed(seed + 1)
            pre = denoising_loss(model, batch.data[idx], cond, gen)
            loss = loss + cfg.beta * pre
            stats["pretrain_loss"] = pre.item()
        stats["loss"] = loss.item()
        return loss, stats

    # -- the shared differentiable path ----------------------------------------------------------
    def run_chain(self, model, cond: Any, uncond: Any, noise: Tensor, grad, *, seed: int,
                  return_trajectory: bool = False) -> Trajectory:
        """The sampling chain from ``noise``; ``grad``: False, True, or the steps to backpropagate through."""
        cfg, inner = self.cfg, _unwrap(model)
        return sample(_Callable(model, inner), cond, sampler=cfg.sampler, num_steps=cfg.num_steps,
                      guidance_scale=cfg.guidance_scale, noise=noise, uncond=uncond, eta=cfg.eta, grad=grad,
                      checkpoint=cfg.checkpoint and grad is not False, return_trajectory=return_trajectory,
                      generator=torch.Generator(noise.device).manual_seed(seed), clip_sample=cfg.clip_sample)

    def last_step(self, model, x0: Tensor, cond: Any, uncond: Any, seed: int) -> Tensor:
        """DRaFT-LV: re-noise ``x0`` to the last step's time ``n`` times and denoise each copy by one
        step with gradient; returns ``[n * B, ...]`` (copy-major)."""
        cfg, inner = self.cfg, _unwrap(model)
        n, B = cfg.lv_samples, x0.shape[0]
        ts = inner.schedule.timesteps(cfg.num_steps)
        t, t_prev = ts[-2], ts[-1]
        gen = torch.Generator().manual_seed(seed + 2)
        eps = torch.randn((n * B, *x0.shape[1:]), generator=gen).to(x0)
        alpha, sigma = (v.float().item() for v in inner.schedule.alpha_sigma(t))
        x_t = alpha * x0.detach().repeat(n, *[1] * (x0.ndim - 1)) + sigma * eps
        c, u = cond_cat(*[cond] * n), None if uncond is None else cond_cat(*[uncond] * n)
        out = guided_prediction(model, x_t, t.to(x_t.device, torch.float32).expand(n * B), c, u, cfg.guidance_scale)
        step = get_step(cfg.sampler)(x_t, out, t, t_prev, eta=cfg.eta, schedule=inner.schedule,
                                     generator=torch.Generator(x0.device).manual_seed(seed + 3),
                                     prediction_type=inner.prediction_type, **self.step_kw)
        return step.prev_sample


class _Callable:
    """The runtime may hand ``loss`` a wrapped model (DDP): calls go through the wrapper (gradient
    sync), the Denoiser attributes come from the model inside."""

    def __init__(self, model, inner):
        self.model, self.prediction_type, self.schedule = model, inner.prediction_type, inner.schedule

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self.model(x_t, t, cond)
