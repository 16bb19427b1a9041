"""Likelihood-free online RL on the forward (noising) process: DiffusionNFT, AWM and CRD.

All three roll out images with *any* sampler (the ODE included: no per-step log-probs are
stored), score them, turn the rewards into group advantages, and then train with the
pretraining objective on freshly noised copies of the generated images,
``x_t = alpha_t x_0 + sigma_t eps``, target ``u = from_x0_eps(x_0, eps)`` (the velocity
``eps - x_0`` for flow models, ``eps`` for epsilon models). They differ in how the reward enters:

- **DiffusionNFT** (Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with
  Forward Process"): the reward becomes an optimality probability
  ``r = 1/2 + 1/2 clip(A, -1, 1)`` (``A`` the reward centred within its prompt's group and divided
  by the group's std, the paper's normaliser ``Z``); from the old policy ``v_old`` and the trained one
  ``v_theta`` it builds the implicit positive policy ``v+ = (1 - beta) v_old + beta v_theta``
  and negative policy ``v- = (1 + beta) v_old - beta v_theta`` and minimises
  ``r ||v+ - u||^2 + (1 - r) ||v- - u||^2`` (each error measured on the predicted ``x_0`` and
  divided by its detached mean absolute value, the paper's adaptive weighting). With ``r = 1/2``
  everywhere and ``v_theta = v_old`` the gradient is exactly zero. No classifier-free guidance
  is needed at training (``train_guidance_scale: 1``).
- **AWM** (Xue et al. 2025, "Advantage Weighted Matching: Aligning RL with Pretraining in
  Diffusion Models"): the flow/score-matching loss of each sample weighted by its advantage,
  ``A_i * w(t) * ||v_theta(x_t, t) - u||^2`` -- pretraining's objective, reweighted -- with an
  optional PPO-style clip of the ratio ``exp(l_old - l_theta)`` (the matching loss is the
  negative log-likelihood surrogate) and a KL term (velocity MSE) to the reference model.
- **CRD** (``crd.py``; Centered Reward Distillation, "Diffusion Reinforcement Learning via Centered Reward
  Distillation"): KL-regularised reward maximisation makes ``log p_theta / p_old`` equal to the
  reward over a temperature minus a prompt-dependent ``log Z``; centring within each prompt's
  group cancels ``log Z``. The implicit reward is the drop in matching loss against the old
  model, ``rho_i = -(l_theta - l_old) / sg(l_old)``, and CRD regresses its within-group centred
  value onto the centred advantage, ``(tau (rho_i - mean_g rho) - A_i)^2``. Rollouts come from a
  separately decayed sampling snapshot (the sampler decoupled from the moving reference), a KL
  term anchors the policy to the CFG-guided pretrained model (``kl_guidance_scale``), and with
  ``reward_adaptive_kl`` its strength grows with the batch's mean reward (weak while rewards are
  low, strong once there is a loophole to exploit).

The *old* policy of NFT / AWM / CRD is a copy of the trained weights updated once per epoch,
``old <- d old + (1 - d) theta`` with ``d = min(decay_start + decay_slope * epoch, decay_max)``;
``d = 0`` makes it the current policy (on-policy). It is part of the algorithm's state, so
``--resume`` restores it.

``pretrain_weight > 0`` adds the pretraining (denoising) loss on renders of the epoch's prompts at
``t ~ U[0, 1]`` (shapes-world prompts: the world's renderer is the pretraining data), the data
regulariser of ReFL (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation") and DPOK (Fan et al. 2023) applied to the forward-process methods: the
reward loss trains a window of ``t`` (``t_min``-``t_max``), and the regulariser keeps the rest of the
range, which the trained weights share, on the data (docs/shapes.md, "The demo on the v2 base").

``uncond_weight > 0`` adds the same policy loss on the unconditional branch (the empty prompt, the same
noised samples and advantages). Rollouts drawn with classifier-free guidance ``u + w (c - u)`` and a loss on
``c`` alone amplify a prompt-independent change ``w``-fold at sampling; learnt in both branches it cancels in
``c - u`` (docs/shapes.md, "The demo on the shipped base").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.func import functional_call

from ..config import check_choice, check_positive, check_range
from ..core.parametrization import (
    cond_cat,
    cond_index,
    from_x0_eps,
    guidance_rule,
    guided_prediction,
    to_x0_eps,
)
from ..core.prompts import negative_prompts
from ..core.schedules import logit_normal_between
from ..core.steps import SAMPLERS
from ._policy_gradient import _unwrap, model_prediction_type, model_schedule
from ._rollout import (
    Batch,
    check_group_batching,
    group_advantages,
    informative_samples,
    render_latents,
    reward_stats,
    rollout,
)


@dataclass
class ForwardProcessConfig:
    group_size: int = 8  # G: images per prompt
    batch_size: int = 64  # images per rollout
    sampler: str = "flow_ode"  # any sampler: these methods need no log-probs
    eta: float = -1.0  # the sampler's noise level; -1 = the sampler's default
    num_steps: int = 10  # sampling steps of the rollouts
    guidance_scale: float = 3.0  # CFG of the rollouts
    train_guidance_scale: float = 1.0  # CFG of the prediction that is trained (1 = conditional only, CFG-free)
    detach_uncond: bool = True  # guided training: the unconditional branch enters without gradient
    timesteps_per_sample: int = 2  # noise levels drawn per image per pass
    t_min: float = 0.0  # training times are drawn from [t_min, t_max] (t = 1 is pure noise)
    t_max: float = 1.0
    t_dist: str = "uniform"  # uniform | logit_normal (restricted to [t_min, t_max])
    adv_clip_max: float = 5.0  # advantages are clipped to [-A, A]
    std_normalize: bool = True  # divide by the group's reward std (False: centre only)
    x0_clip: float = 0.0  # clamp the generated samples to [-c, c] before training on them (pixel-space models: 1, the
    # range the decoded image -- what the reward saw -- is clamped to); 0 = off (latent models)
    negative_weight: float = 1.0  # scale of negative advantages (0: learn from the better-than-average samples only)
    beta: float = 0.0  # KL (velocity MSE) to the reference (pretrained) model
    pretrain_weight: float = 0.0  # weight of the pretraining loss on world renders at t ~ U[0, 1] (0 = off)
    uncond_weight: float = 0.0  # the same policy loss on the unconditional (empty-prompt) branch, this weight (0 = off)
    kl_guidance_scale: float = 1.0  # CFG of the reference prediction in the KL term (CRD anchors to the guided model)
    decay_start: float = 0.0  # old-policy decay schedule d = min(start + slope * epoch, max)
    decay_slope: float = 0.0
    decay_max: float = 0.0
    sample_with: str = "current"  # current | old: which weights roll out
    micro_batch_size: int = 32
    steps_per_epoch: int = 1  # optimiser steps per pass
    inner_epochs: int = 1
    skip_zero_std_groups: bool = False  # train only on groups whose rewards differ (DAPO's dynamic-sampling filter)

    def __post_init__(self) -> None:
        for name in ("group_size", "batch_size", "num_steps", "timesteps_per_sample", "micro_batch_size",
                     "steps_per_epoch", "inner_epochs"):
            check_positive(name, getattr(self, name), integer=True)
        check_group_batching(self.group_size, self.batch_size, self.steps_per_epoch)
        check_choice("sampler", self.sampler, list(SAMPLERS))
        if self.eta != -1.0:
            check_range("eta", self.eta, 0, 2)
        check_range("guidance_scale", self.guidance_scale, 0, None)
        check_range("train_guidance_scale", self.train_guidance_scale, 0, None)
        check_range("kl_guidance_scale", self.kl_guidance_scale, 0, None)
        check_range("t_min", self.t_min, 0, 1, hi_open=True)
        check_range("t_max", self.t_max, 0, 1, lo_open=True)
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min={self.t_min} must be < t_max={self.t_max}")
        check_choice("t_dist", self.t_dist, ["uniform", "logit_normal"])
        check_positive("adv_clip_max", self.adv_clip_max)
        check_range("negative_weight", self.negative_weight, 0, 1)
        check_range("x0_clip", self.x0_clip, 0, None)
        check_range("beta", self.beta, 0, None)
        check_range("pretrain_weight", self.pretrain_weight, 0, None)
        check_range("uncond_weight", self.uncond_weight, 0, None)
        if self.uncond_weight > 0 and self.train_guidance_scale != 1.0:
            raise ValueError(f"uncond_weight={self.uncond_weight} trains the unconditional branch beside the "
                             f"conditional one; it needs train_guidance_scale: 1, got {self.train_guidance_scale}")
        for name in ("decay_start", "decay_max"):
            check_range(name, getattr(self, name), 0, 1, hi_open=True)
        check_range("decay_slope", self.decay_slope, 0, None)
        check_choice("sample_with", self.sample_with, ["current", "old"])

    @property
    def prompts_per_epoch(self) -> int:
        return self.batch_size // self.group_size

    def decay(self, epoch: int) -> float:
        return min(self.decay_start + self.decay_slope * epoch, self.decay_max)


@dataclass
class ForwardMicroBatch:
    """Some samples of a rollout, each with its own noise level and noise draw."""

    batch: Batch
    idx: Tensor  # [m] sample indices
    t: Tensor  # [m] training times
    noise: Tensor  # [m, ...] eps
    unit: Tensor | None = None  # [m] comparison unit (CRD: one group at one shared noise draw)
    reg: tuple[int, Tensor, Tensor] | None = None  # pretraining regulariser: (render seed, t [m], eps [m, ...])


def sample_times(n: int, cfg: ForwardProcessConfig, generator: torch.Generator) -> Tensor:
    """``n`` training times in ``[t_min, t_max]``: uniform, or a logit-normal restricted to the interval
    by inverse-CDF sampling (SD3's training density)."""
    if cfg.t_dist == "uniform":
        return cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(n, generator=generator, dtype=torch.float64)
    return logit_normal_between(n, generator, cfg.t_min, cfg.t_max)


def matching_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error of a prediction (averaged over non-batch dims)."""
    return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))


class OldPolicy:
    """A detached copy of the trained parameters, ``old <- d old + (1 - d) theta`` once per epoch."""

    def __init__(self) -> None:
        self.params: dict[str, Tensor] | None = None

    @torch.no_grad()
    def update(self, model: Any, decay: float) -> None:
        current = {k: v.detach() for k, v in _unwrap(model).named_parameters() if v.requires_grad}
        if self.params is None or decay == 0.0:
            self.params = {k: v.clone() for k, v in current.items()}
            return
        for k, v in current.items():
            self.params[k].lerp_(v, 1 - decay)

    @torch.no_grad()
    def __call__(self, model: Any, *args: Any) -> Tensor:
        return functional_call(_unwrap(model), self.params, args, strict=False)

    def bind(self, model: Any) -> Callable:
        """The old policy as a denoiser ``f(x_t, t, cond)`` (for sampling and CFG, which it combines
        as its model does: ``guidance_rule``)."""
        def old(x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
            return self(model, x_t, t, cond)

        old.combine_guidance = guidance_rule(model)
        return old


class _OldPolicyModel(torch.nn.Module):
    """Wraps the model so that sampling code (``rollout``) runs the old weights."""

    def __init__(self, model: Any, old: OldPolicy):
        super().__init__()
        self.inner, self.old = model, old

    def forward(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self.old(self.inner, x_t, t, cond)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def final_rollout(model, prompts: list[str], reward: Callable, cfg: ForwardProcessConfig, seed: int) -> Batch:
    """A rollout that keeps only the final samples (``latents`` is ``[N, ...]``: no trajectory)."""
    batch = rollout(model, prompts, reward, group_size=cfg.group_size, sampler=cfg.sampler, num_steps=cfg.num_steps,
                    eta=None if cfg.eta == -1.0 else cfg.eta, guidance_scale=cfg.guidance_scale, sde_steps=None,
                    seed=seed)
    batch.latents = batch.latents[:, -1].contiguous()
    if cfg.x0_clip > 0:
        batch.latents = batch.latents.clamp(-cfg.x0_clip, cfg.x0_clip)
    batch.log_probs = batch.log_probs[:, :0]
    return batch


def finish_batch(batch: Batch, model, cfg: ForwardProcessConfig) -> Batch:
    """Group advantages (clipped, 0 where the reward failed), reward stats, the empty prompt if needed."""
    adv = group_advantages(batch.rewards, batch.group, std=cfg.std_normalize)
    adv = torch.where(adv < 0, cfg.negative_weight * adv, adv)
    batch.advantages = torch.where(batch.valid, adv, torch.zeros_like(adv)).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
    batch.info.update(reward_stats(batch))
    if batch.uncond is None and (cfg.train_guidance_scale != 1.0 or cfg.kl_guidance_scale != 1.0
                                 or cfg.uncond_weight > 0):
        batch.uncond = model.encode_prompts(negative_prompts(batch.prompts))
    return batch


class ForwardProcessRL:
    """Shared rollout / time sampling / old-policy bookkeeping; subclasses define ``policy_loss``."""

    name = "forward_process"
    spread_micro_batches = True  # ``loss`` has no side effects: processes may split each step's micro-batches

    @property
    def samples_with_policy(self) -> bool:
        """Rollouts run the trained weights themselves (not the old policy's copy): LoRA may be merged."""
        return self.cfg.sample_with == "current"

    def __init__(self, cfg: ForwardProcessConfig, *, reward: Callable, reference: Callable | None = None):
        if cfg.beta > 0 and reference is None:
            raise ValueError(f"beta={cfg.beta} needs a reference model")
        self.cfg, self.reward, self.reference = cfg, reward, reference
        self.old = OldPolicy()

    # -- the Algorithm protocol ---------------------------------------------------------------
    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> Batch:
        cfg = self.cfg
        self.old.update(model, cfg.decay(epoch))
        sampler_model = _OldPolicyModel(model, self.old) if cfg.sample_with == "old" else model
        batch = finish_batch(final_rollout(sampler_model, prompts, self.reward, cfg, seed), model, cfg)
        batch.info["old_decay"] = cfg.decay(epoch)
        if cfg.skip_zero_std_groups:
            batch.info["trained_fraction"] = float(informative_samples(batch).float().mean())
        return batch

    def _chunks(self, batch: Batch, generator: torch.Generator) -> list[Tensor]:
        order = torch.randperm(len(batch), generator=generator)
        if self.cfg.skip_zero_std_groups:  # the same permutation is drawn either way: resume draws the same
            order = order[informative_samples(batch)[order]]
            if len(order) == 0:
                return []
        return list(order.chunk(self.cfg.steps_per_epoch))

    def minibatches(self, batch: Batch, generator: torch.Generator) -> Iterator[list[ForwardMicroBatch]]:
        """One list per optimiser step: a chunk of the samples, each at ``timesteps_per_sample`` fresh
        noise levels (all drawn from ``generator``, so a resumed run draws the same)."""
        cfg = self.cfg
        x0 = batch.latents
        for chunk in self._chunks(batch, generator):
            idx = chunk.repeat(cfg.timesteps_per_sample)
            t = sample_times(len(idx), cfg, generator)
            noise = torch.randn((len(idx), *x0.shape[1:]), generator=generator).to(x0.dtype)
            yield [ForwardMicroBatch(batch, idx[s], t[s], noise[s], reg=self.draw_reg(len(s), x0, generator))
                   for s in torch.arange(len(idx)).split(cfg.micro_batch_size)]

    def draw_reg(self, n: int, x0: Tensor, generator: torch.Generator) -> tuple[int, Tensor, Tensor] | None:
        """The regulariser's render seed, times and noise for ``n`` samples (from ``generator``, so a
        resumed run draws the same); None when ``pretrain_weight`` is 0 (nothing drawn)."""
        if self.cfg.pretrain_weight == 0:
            return None
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        t = torch.rand(n, generator=generator)
        return seed, t, torch.randn((n, *x0.shape[1:]), generator=generator).to(x0.dtype)

    def pretrain_term(self, model, micro: ForwardMicroBatch, cond: Any) -> Tensor:
        """The pretraining loss of the conditional prediction on renders of the micro-batch's prompts."""
        prompts = [micro.batch.prompts[i] for i in micro.idx.tolist()]
        seed, t, eps = micro.reg
        device = micro.batch.latents.device
        what = (f"{self.name}: pretrain_weight > 0 renders shapes-world prompts as its data, got {{prompt}}; "
                "set pretrain_weight: 0 for other prompts")
        x0 = render_latents(_unwrap(model), prompts, seed, device, what=what).to(micro.batch.latents.dtype)
        t = t.to(device).clamp_min(1e-4)
        alpha, sigma = model_schedule(model).alpha_sigma(t)
        shape = (-1, *[1] * (x0.ndim - 1))
        alpha, sigma = alpha.to(x0.dtype).view(shape), sigma.to(x0.dtype).view(shape)
        eps = eps.to(device)
        target = from_x0_eps(x0, eps, alpha, sigma, model_prediction_type(model))
        return matching_loss(model(alpha * x0 + sigma * eps, t.to(x0.dtype), cond), target).mean()

    # -- pieces for the losses ----------------------------------------------------------------
    def noised(self, model, micro: ForwardMicroBatch) -> tuple[Tensor, Tensor, Tensor, Any, Any, Tensor, Tensor]:
        batch = micro.batch
        device = batch.latents.device
        x0 = batch.latents[micro.idx]
        eps = micro.noise.to(device)
        t = micro.t.to(device).clamp_min(1e-4)  # t = 0 has no noise to predict
        alpha, sigma = model_schedule(model).alpha_sigma(t)
        alpha, sigma = alpha.to(x0.dtype), sigma.to(x0.dtype)
        x_t = alpha.view(-1, *[1] * (x0.ndim - 1)) * x0 + sigma.view(-1, *[1] * (x0.ndim - 1)) * eps
        target = from_x0_eps(x0, eps, alpha, sigma, model_prediction_type(model))
        cond = cond_index(batch.cond, micro.idx)
        uncond = None if batch.uncond is None else cond_index(batch.uncond, micro.idx)
        return x0, x_t, t.to(x0.dtype), cond, uncond, target, torch.stack([alpha, sigma])

    def predict(self, fn, x_t: Tensor, t: Tensor, cond: Any, uncond: Any, scale: float,
                detach_uncond: bool = False) -> Tensor:
        """The (guided) prediction. With ``detach_uncond`` the unconditional branch is a constant of
        the gradient: ``u + w (c - u)`` trains through ``c`` only. Trained with the gradient through
        both branches, the matching loss pushes the unconditional branch *away* from the target
        (its coefficient is ``1 - w < 0``) and the guided policy diverges (measured)."""
        if scale == 1.0:
            return fn(x_t, t, cond)
        if not detach_uncond:
            return guided_prediction(fn, x_t, t, cond, uncond, scale)
        c, u = fn(torch.cat([x_t, x_t]), torch.cat([t, t]), cond_cat(cond, uncond)).chunk(2)
        return guidance_rule(fn)(c, u.detach(), scale)

    def kl_term(self, pred: Tensor, x_t: Tensor, t: Tensor, cond: Any, uncond: Any) -> Tensor:
        """Velocity-space KL surrogate ``||v_theta - v_ref||^2`` against the (guided) reference."""
        scale = self.cfg.kl_guidance_scale
        ref = self.reference(lambda m: self.predict(m, x_t, t, cond, uncond, scale))
        return matching_loss(pred, ref.detach())

    def kl_coef(self, batch: Batch) -> float:
        return self.cfg.beta

    def loss(self, model, micro: ForwardMicroBatch) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        x0, x_t, t, cond, uncond, target, alpha_sigma = self.noised(model, micro)
        pred = self.predict(model, x_t, t, cond, uncond, cfg.train_guidance_scale, cfg.detach_uncond)
        with torch.no_grad():
            pred_old = self.predict(self.old.bind(model), x_t, t, cond, uncond, cfg.train_guidance_scale)
        adv = micro.batch.advantages[micro.idx].to(pred.device)
        per_sample, stats = self.policy_loss(pred, pred_old, target, x0, x_t, alpha_sigma, t, adv, micro, model)
        loss = per_sample.mean()
        stats["policy_loss"] = loss.detach()  # 0-d tensors: read once per epoch
        coef = self.kl_coef(micro.batch)
        if coef > 0:
            kl = self.kl_term(pred, x_t, t, cond, uncond).mean()
            loss = loss + coef * kl
            stats["kl"], stats["kl_coef"] = kl.detach(), coef
        if cfg.uncond_weight > 0:
            pred_u = self.predict(model, x_t, t, uncond, None, 1.0)
            with torch.no_grad():
                pred_old_u = self.predict(self.old.bind(model), x_t, t, uncond, None, 1.0)
            per_u, _ = self.policy_loss(pred_u, pred_old_u, target, x0, x_t, alpha_sigma, t, adv, micro, model)
            loss = loss + cfg.uncond_weight * per_u.mean()
            stats["uncond_loss"] = per_u.mean().detach()
        if cfg.pretrain_weight > 0:
            reg = self.pretrain_term(model, micro, cond)
            loss = loss + cfg.pretrain_weight * reg
            stats["pretrain_loss"] = reg.detach()
        stats["loss"] = loss.detach()
        return loss, stats

    def policy_loss(self, pred, pred_old, target, x0, x_t, alpha_sigma, t, adv, micro, model):
        raise NotImplementedError

    # -- state (resume) -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"old": None if self.old.params is None else {k: v.cpu() for k, v in self.old.params.items()}}

    def load_state_dict(self, state: dict) -> None:
        old = state.get("old")
        self.old.params = None if old is None else {k: v.clone() for k, v in old.items()}


# ----------------------------------------------------------------------------------------------
# DiffusionNFT
# ----------------------------------------------------------------------------------------------
@dataclass
class NFTConfig(ForwardProcessConfig):
    nft_beta: float = 1.0  # strength of the implicit guidance between the old and the trained policy
    adaptive_weight: bool = True  # divide each x0 error by its detached mean |error| (the paper's weighting)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("nft_beta", self.nft_beta)


def optimality_probability(advantages: Tensor) -> Tensor:
    """DiffusionNFT's optimality probability ``r = 1/2 + 1/2 clip(A, -1, 1)`` in ``[0, 1]`` for
    normalised advantages ``A = (r_raw - mean_group) / Z``."""
    return 0.5 + 0.5 * advantages.clamp(-1, 1)


def nft_loss(pred: Tensor, pred_old: Tensor, x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor,
             r: Tensor, beta: float, prediction_type: str, adaptive_weight: bool = True) -> Tensor:
    """Per-sample DiffusionNFT loss ``[r ||x0(v+) - x0||^2 + (1 - r) ||x0(v-) - x0||^2] / beta``."""
    pos = (1 - beta) * pred_old + beta * pred
    neg = (1 + beta) * pred_old - beta * pred
    dims = tuple(range(1, x0.ndim))

    def err(v: Tensor) -> Tensor:
        x0_hat, _ = to_x0_eps(v, x_t, alpha, sigma, prediction_type)
        diff = x0_hat.float() - x0.float()
        sq = (diff**2).mean(dim=dims)
        if adaptive_weight:
            sq = sq / diff.abs().mean(dim=dims).detach().clamp_min(1e-5)
        return sq

    return (r * err(pos) + (1 - r) * err(neg)) / beta


class DiffusionNFT(ForwardProcessRL):
    name = "diffusion_nft"

    def policy_loss(self, pred, pred_old, target, x0, x_t, alpha_sigma, t, adv, micro, model):
        cfg = self.cfg
        r = optimality_probability(adv)
        per = nft_loss(pred, pred_old, x0, x_t, alpha_sigma[0], alpha_sigma[1], r, cfg.nft_beta,
                       model_prediction_type(model), cfg.adaptive_weight)
        return per, {"optimality_mean": r.mean().detach()}


# ----------------------------------------------------------------------------------------------
# AWM
# ----------------------------------------------------------------------------------------------
@dataclass
class AWMConfig(ForwardProcessConfig):
    weighting: str = "uniform"  # w(t): uniform | t | t2
    clip_range: float = 0.0  # PPO-style clip of exp(l_old - l_theta); 0 = off

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("weighting", self.weighting, ["uniform", "t", "t2"])
        check_range("clip_range", self.clip_range, 0, 1)


def time_weight(t: Tensor, weighting: str) -> Tensor:
    if weighting == "uniform":
        return torch.ones_like(t)
    return t if weighting == "t" else t**2


def awm_loss(loss_theta: Tensor, loss_old: Tensor, adv: Tensor, weight: Tensor, clip_range: float) -> Tensor:
    """Per-sample AWM objective. Without clipping ``A w l_theta``; with clipping PPO's
    ``max(-A rho, -A clip(rho, 1 - eps, 1 + eps))`` on ``rho = exp(w (l_old - l_theta))``, whose
    gradient at ``rho = 1`` is the same ``A w grad l_theta``."""
    if clip_range == 0:
        return adv * weight * loss_theta
    rho = torch.exp(weight * (loss_old.detach() - loss_theta))
    return torch.maximum(-adv * rho, -adv * rho.clamp(1 - clip_range, 1 + clip_range))


class AWM(ForwardProcessRL):
    name = "awm"

    def policy_loss(self, pred, pred_old, target, x0, x_t, alpha_sigma, t, adv, micro, model):
        cfg = self.cfg
        l_theta, l_old = matching_loss(pred, target), matching_loss(pred_old, target)
        per = awm_loss(l_theta, l_old, adv, time_weight(t.float(), cfg.weighting), cfg.clip_range)
        return per, {"matching_loss": l_theta.mean().detach()}


PRESETS: dict[str, tuple[type, type, dict]] = {
    # DiffusionNFT: CFG-free training, the old policy trails the current one (d ramps to 0.5)
    "diffusion_nft": (NFTConfig, DiffusionNFT, {"train_guidance_scale": 1.0, "decay_slope": 0.001,
                                                 "decay_max": 0.5}),
    "awm": (AWMConfig, AWM, {}),
}
