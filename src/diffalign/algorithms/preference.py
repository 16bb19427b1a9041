"""Preference optimisation on clean samples: Diffusion-DPO, Diffusion-KTO and MaPO.

Each method noises chosen / rejected (or desirable / undesirable) samples ``x_0`` at a random time
``t`` and compares the model's denoising errors, the diffusion stand-in for a log-likelihood (an
ELBO):

- **Diffusion-DPO** (Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference
  Optimization", Eq. 14)::

      L = -log sigmoid(-beta T w(t) [ (||e^w - e_theta(x^w_t, t)||^2 - ||e^w - e_ref(x^w_t, t)||^2)
                                     - (||e^l - e_theta(x^l_t, t)||^2 - ||e^l - e_ref(x^l_t, t)||^2) ])

  with ``x^w_t`` and ``x^l_t`` noised at the same ``t`` with the same noise, ``t`` uniform. Errors are
  means over elements and ``T w(t) = 1/2`` (constant weighting, the normalisation of the authors'
  training code), the scale on which the paper's ``beta = 5000`` (SD 1.5) is given. The error is
  measured in the model's own parametrisation (``error_space: native``): the noise ``e`` for
  epsilon models, the velocity ``v = e - x_0`` for flow-matching models (the flow form of the
  loss); any other space is reached through ``core.parametrization``.
- **Diffusion-KTO** (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility"):
  unpaired desirable / undesirable samples. With the implicit log-ratio
  ``g = -(||e - e_theta||^2 - ||e - e_ref||^2)`` and the reference point
  ``Q_ref = max(0, mean_batch g)`` (an estimate of ``KL(p_theta || p_ref)``, no gradient), the
  utility is ``U = sigmoid(beta y (g - Q_ref))``, ``y = +1`` for desirable and ``-1`` for undesirable
  samples, and ``L = E[lambda_y (1 - U)]`` (the Kahneman-Tversky value of Ethayarajh et al. 2024).
- **MaPO** (Hong et al. 2024, "Margin-aware Preference Optimization for Aligning Diffusion Models
  without Reference"): no reference model. A bounded score of each error,
  ``s(L) = gamma L / (exp(gamma L) - 1)`` (1 at ``L = 0``, falling to 0), gives the margin
  ``T (s(L^w) - s(L^l))``, and ``L_MaPO = L^w - beta log sigmoid(T (s(L^w) - s(L^l)))``: the
  chosen samples' denoising loss plus the margin term.

Where the samples come from (``source``): ``reference`` draws ``K`` samples per prompt from the
frozen base model and keeps the best and worst by the training reward (verifier-labelled pairs of
the base model, i.e. offline data made on the fly); ``policy`` draws them from the current model
(iterative / online DPO); ``file`` reads pairs with :func:`diffalign.data.load_pairs` and skips ties.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_choice, check_positive, check_range
from ..core.parametrization import (
    PREDICTION_TYPES,
    broadcast_to,
    cond_index,
    cond_map,
    convert,
    from_x0_eps,
    guided_prediction,
)
from ..core.prompts import negative_prompts
from ..core.schedules import sample_timesteps
from ..core.steps import SAMPLERS
from ._policy_gradient import _unwrap, model_prediction_type, model_schedule
from ._rollout import reward_stats, rollout

SOURCES = ("reference", "policy", "file")
ERROR_SPACES = ("native",) + PREDICTION_TYPES
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
DPO_WEIGHT = 0.5  # T w(t): constant, as the authors' code normalises it (errors are element means)


# ----- the losses, pure functions of per-sample errors --------------------------------------------
def diffusion_dpo_loss(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor,
                       beta: float) -> tuple[Tensor, dict[str, float]]:
    """Diffusion-DPO (Wallace et al. 2023, Eq. 14) on per-sample errors ``[B]``; see the module doc."""
    margin = -beta * DPO_WEIGHT * ((err_w - ref_err_w) - (err_l - ref_err_l))  # implicit reward margin
    loss = -F.logsigmoid(margin).mean()
    return loss, {"reward_margin": margin.mean().item(), "implicit_acc": (margin > 0).float().mean().item()}


def diffusion_kto_loss(err: Tensor, ref_err: Tensor, desirable: Tensor, beta: float, lambda_d: float = 1.0,
                       lambda_u: float = 1.0) -> tuple[Tensor, dict[str, float]]:
    """Diffusion-KTO (Li et al. 2024) on per-sample errors ``[B]`` and labels ``desirable [B]``."""
    g = -(err - ref_err)  # implicit log p_theta / p_ref, up to the weighting absorbed into beta
    q_ref = g.mean().detach().clamp_min(0)  # the reference point (KTO's KL estimate, no gradient)
    y = desirable.float() * 2 - 1
    utility = torch.sigmoid(beta * y * (g - q_ref))
    lam = torch.where(desirable, torch.full_like(g, lambda_d), torch.full_like(g, lambda_u))
    loss = (lam * (1 - utility)).mean()
    return loss, {"kl_ref_point": q_ref.item(), "utility": utility.mean().item()}


def mapo_score(err: Tensor, gamma: float) -> Tensor:
    """MaPO's bounded score ``s(L) = gamma L / (exp(gamma L) - 1)``, in ``(0, 1]``, decreasing in ``L``."""
    x = (gamma * err).clamp_min(0)
    small = x < 1e-6  # x / expm1(x) -> 1 - x/2 near 0, where the ratio is 0/0
    return torch.where(small, 1 - x / 2, x / torch.expm1(torch.where(small, torch.ones_like(x), x)))


def mapo_loss(err_w: Tensor, err_l: Tensor, beta: float, gamma: float, T: float) -> tuple[Tensor, dict[str, float]]:
    """MaPO (Hong et al. 2024): ``L^w - beta log sigmoid(T (s(L^w) - s(L^l)))``; no reference model."""
    margin = T * (mapo_score(err_w, gamma) - mapo_score(err_l, gamma))
    loss = (err_w - beta * F.logsigmoid(margin)).mean()
    return loss, {"margin": margin.mean().item(), "implicit_acc": (margin > 0).float().mean().item()}


# ----- denoising errors (timesteps: core.schedules.sample_timesteps) ------------------------------
def denoising_error(model: Callable, x0: Tensor, t: Tensor, noise: Tensor, cond: Any, *, schedule: Any,
                    prediction_type: str, error_space: str = "native", reduce: bool = True) -> Tensor:
    """``||target - prediction||^2`` averaged over non-batch dims, for ``x_t = alpha x_0 + sigma noise``
    (``reduce=False``: the residual ``prediction - target`` itself, ``[B, ...]``).

    The prediction is converted to ``error_space`` (``native``: the model's own type) and compared
    with that space's target built from ``(x_0, noise)``.
    """
    alpha, sigma = schedule.alpha_sigma(t.double())
    alpha, sigma = broadcast_to(alpha.float(), x0), broadcast_to(sigma.float(), x0)
    x0, noise = x0.float(), noise.float()
    x_t = alpha * x0 + sigma * noise
    space = prediction_type if error_space == "native" else error_space
    pred = convert(model(x_t, t, cond).float(), x_t, alpha, sigma, prediction_type, space)
    target = from_x0_eps(x0, noise, alpha, sigma, space)
    return (pred - target).pow(2).mean(dim=tuple(range(1, x0.ndim))) if reduce else pred - target


# ----- configs ---------------------------------------------------------------------------------------
@dataclass
class PreferenceConfig:
    source: str = "reference"  # reference | policy (K samples per prompt, best vs worst) | file (`data`)
    data: str = ""  # pairs .jsonl / .parquet / directory (source: file)
    pairs_per_epoch: int = 32  # prompts per epoch (one pair each at most), or pairs drawn from `data`
    group_size: int = 4  # K: samples per prompt the pair is picked from
    min_margin: float = 0.0  # reward gap a pair needs; smaller gaps are ties and skipped
    sampler: str | None = None  # sampling of on-policy pairs; None = the model's default
    num_steps: int | None = None
    guidance_scale: float | None = None
    eta: float | None = None
    error_space: str = "native"  # parametrisation the denoising error is measured in
    timestep_sampling: str = "uniform"  # t ~ U(0, 1) (the papers'); logit_normal for flow models
    t_min: float = 0.0  # t is drawn from [t_min, t_max] only (t = 1: pure noise; the layout is set near it)
    t_max: float = 1.0
    train_guidance_scale: float = 1.0  # 1: errors of the conditional model (the papers); w > 1: of the CFG-guided one
    uncond_fraction: float = 0.0  # share of pairs trained on the empty prompt (CFG dropout); 0: conditional only
    timesteps_per_pair: int = 1  # (t, noise) draws per pair (or unpaired sample) per pass, trained in the same passes
    micro_batch_size: int = 16  # pair rows (pair x draw; unpaired: 2 samples a row) per forward pass
    steps_per_epoch: int = 1  # optimiser steps per pass over the epoch's pairs
    inner_epochs: int = 1  # passes over each epoch's pairs (fresh t and noise each pass)

    def __post_init__(self) -> None:
        check_choice("source", self.source, SOURCES)
        if self.source == "file" and not self.data:
            raise ValueError("source 'file' needs `data`: a pairs .jsonl, .parquet or directory")
        if self.data and self.source != "file":
            raise ValueError(f"data={self.data!r} is read only with source 'file', got source {self.source!r}")
        for name in ("pairs_per_epoch", "timesteps_per_pair", "micro_batch_size", "steps_per_epoch", "inner_epochs"):
            check_positive(name, getattr(self, name), integer=True)
        check_range("group_size", self.group_size, 2, None, integer=True)
        check_range("min_margin", self.min_margin, 0, None)
        if self.sampler is not None:
            check_choice("sampler", self.sampler, SAMPLERS)
        if self.num_steps is not None:
            check_positive("num_steps", self.num_steps, integer=True)
        if self.guidance_scale is not None:
            check_range("guidance_scale", self.guidance_scale, 0, None)
        if self.eta is not None:
            check_range("eta", self.eta, 0, 2)
        check_choice("error_space", self.error_space, ERROR_SPACES)
        check_choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        check_range("t_min", self.t_min, 0, 1, hi_open=True)
        check_range("t_max", self.t_max, 0, 1, lo_open=True)
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min={self.t_min} must be < t_max={self.t_max}")
        check_range("train_guidance_scale", self.train_guidance_scale, 0, None)
        check_range("uncond_fraction", self.uncond_fraction, 0, 1, hi_open=True)

    @property
    def prompts_per_epoch(self) -> int:
        return self.pairs_per_epoch


@dataclass
class DPOConfig(PreferenceConfig):
    beta: float = 5000.0  # beta of Diffusion-DPO (the paper's SD 1.5 value)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("beta", self.beta)


@dataclass
class KTOConfig(PreferenceConfig):
    beta: float = 5000.0  # beta of the utility's argument (same scale as Diffusion-DPO's)
    lambda_d: float = 1.0  # lambda_D: weight of desirable samples
    lambda_u: float = 1.0  # lambda_U: weight of undesirable samples
    desirable_threshold: float | None = None  # None: best / worst of each prompt; else reward >= it is desirable

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("beta", self.beta)
        check_positive("lambda_d", self.lambda_d)
        check_positive("lambda_u", self.lambda_u)
        if self.desirable_threshold is not None and self.source == "file":
            raise ValueError("desirable_threshold labels on-policy samples by reward; with source 'file' the "
                             "chosen images are the desirable ones")


@dataclass
class MaPOConfig(PreferenceConfig):
    source: str = "policy"  # MaPO holds no reference model: policy or file
    beta_mapo: float = 0.1  # beta: weight of the margin term
    gamma: float = 0.5  # gamma of the bounded score s(L) (the authors' snr_value)
    num_timesteps: float = 1000.0  # T: the margin is scaled by the number of diffusion steps

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == "reference":
            raise ValueError("MaPO is reference-free: source must be 'policy' or 'file', got 'reference'")
        check_positive("beta_mapo", self.beta_mapo)
        check_positive("gamma", self.gamma)
        check_positive("num_timesteps", self.num_timesteps)

    @property
    def beta(self) -> float:
        """KL weight seen by the runtime: 0, so no reference model is ever built for MaPO."""
        return 0.0


# ----- data ------------------------------------------------------------------------------------------
@dataclass
class PairBatch:
    """One epoch's samples and which of them are preferred (indices into the samples)."""

    prompts: list[str]  # [N] prompt of each sample
    pixels: Tensor  # [N, 3, H, W] uint8: the images (a quarter of float32's memory for large pairs)
    x0: Tensor  # [N, ...] the samples in model space
    cond: Any  # encoded prompts, batched like the samples
    uncond: Any  # encoded empty prompt, batched like the samples (None unless guidance or dropout needs it)
    chosen: Tensor  # [M] chosen / desirable sample indices
    rejected: Tensor  # [M'] rejected / undesirable sample indices (M' = M for pairs)
    schedule: Any  # the model's noise schedule (timesteps are drawn on it)
    rewards: Tensor | None = None  # [N] the reward that labelled on-policy samples (None for a file)
    info: dict[str, float] = field(default_factory=dict)
    source_pairs: list | None = None  # file source: the PreferencePair behind chosen[i] / rejected[i]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def images(self) -> Tensor:
        """``[N, 3, H, W]`` in ``[0, 1]`` (the runtime scores held-out rewards on them)."""
        return self.pixels.float() / 255


def to_pixels(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@dataclass
class PairMicroBatch:
    batch: PairBatch
    idx: Tensor  # sample indices (pairs: the chosen half, then the rejected half)
    t: Tensor  # [len(idx)]
    noise: Tensor  # [len(idx), ...]
    desirable: Tensor | None = None  # [len(idx)] bool (unpaired methods)
    dropped: Tensor | None = None  # [len(idx)] bool: trained on the empty prompt (uncond_fraction)


def best_worst_pairs(rewards: Tensor, group: Tensor, min_margin: float) -> tuple[Tensor, Tensor]:
    """Per group, the best and the worst sample, if their rewards differ by more than ``min_margin``."""
    chosen, rejected = [], []
    for g in group.unique():
        idx = torch.nonzero((group == g) & torch.isfinite(rewards)).flatten()
        if len(idx) < 2:
            continue
        r = rewards[idx]
        hi, lo = idx[r.argmax()], idx[r.argmin()]
        if rewards[hi] - rewards[lo] > min_margin:
            chosen.append(int(hi))
            rejected.append(int(lo))
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)


def sampling_settings(model: Any, cfg: PreferenceConfig) -> dict[str, Any]:
    """The model's default sampling settings, overridden by the config's non-None fields."""
    d = {"sampler": "flow_ode", "num_steps": 10, "guidance_scale": 1.0, "eta": None, "clip_sample": 0.0,
         **getattr(_unwrap(model), "sampling_defaults", {})}
    for k in ("sampler", "num_steps", "guidance_scale", "eta"):
        if getattr(cfg, k) is not None:
            d[k] = getattr(cfg, k)
    return d


class PairedPreference:
    """``collect`` builds (or reads) pairs; ``minibatches`` draws ``t`` and noise; ``loss`` is the method's."""

    name = "preference"
    uses_reference = True

    @property
    def samples_with_policy(self) -> bool:
        """Pairs sampled by the trained weights without gradient (LoRA may be merged for it)."""
        return self.cfg.source == "policy"

    def __init__(self, cfg: PreferenceConfig, *, reward: Callable, reference: Callable | None = None):
        if self.uses_reference and reference is None:
            raise ValueError(f"{self.name} needs a reference model (beta={getattr(cfg, 'beta', None)})")
        if not self.uses_reference and reference is not None:
            raise ValueError(f"{self.name} is reference-free and must not be given a reference model")
        self.cfg, self.reward, self.reference = cfg, reward, reference
        self._file_pairs: list | None = None

    # -- data ------------------------------------------------------------------------------------
    def select(self, rewards: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
        return best_worst_pairs(rewards, group, self.cfg.min_margin)

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> PairBatch:
        cfg = self.cfg
        if cfg.source == "file":
            return self._from_file(model, seed)
        s = sampling_settings(model, cfg)

        def run(m):
            return rollout(m, prompts, self.reward, group_size=cfg.group_size, sampler=s["sampler"],
                           num_steps=s["num_steps"], eta=s["eta"], guidance_scale=s["guidance_scale"],
                           sde_steps=None, seed=seed, clip_sample=s.get("clip_sample") or 0.0)

        b = self.reference(run) if cfg.source == "reference" else run(model)
        chosen, rejected = self.select(b.rewards, b.group)
        info = {**reward_stats(b), "pairs": float(len(chosen)), "reward_failed": b.info["reward_failed"]}
        return PairBatch(prompts=b.prompts, pixels=to_pixels(b.images), x0=b.latents[:, -1], cond=b.cond,
                         uncond=self._uncond(model, b.prompts), chosen=chosen, rejected=rejected,
                         schedule=model_schedule(model), rewards=b.rewards, info=info)

    def _uncond(self, model, prompts: list[str]) -> Any:
        needed = self.cfg.train_guidance_scale != 1.0 or self.cfg.uncond_fraction > 0
        return _unwrap(model).encode_prompts(negative_prompts(prompts)) if needed else None

    def _load_file(self) -> list:
        if self._file_pairs is None:
            from ..data import load_pairs

            pairs = [p for p in load_pairs(self.cfg.data) if not p.tie]
            if not pairs:
                raise ValueError(f"data={self.cfg.data!r} holds no non-tie pairs; preference methods need "
                                 "at least one pair with a chosen and a rejected image")
            self._file_pairs = pairs
        return self._file_pairs

    @torch.no_grad()
    def _from_file(self, model, seed: int) -> PairBatch:
        pairs = self._load_file()
        rng = np.random.default_rng(seed)
        pick = [pairs[i] for i in rng.choice(len(pairs), min(self.cfg.pairs_per_epoch, len(pairs)), replace=False)]
        shapes = {im.shape for p in pick for im in (p.chosen, p.rejected)}
        if len(shapes) != 1:
            raise ValueError(f"pairs in {self.cfg.data!r} mix image sizes {sorted(shapes)}; resize them to one size")
        pixels = torch.from_numpy(np.stack([p.chosen for p in pick] + [p.rejected for p in pick])).permute(0, 3, 1, 2)
        base = _unwrap(model)
        device = next(base.parameters()).device
        chunk = 2 * self.cfg.micro_batch_size  # VAEs of real models encode a few images at a time
        x0 = torch.cat([base.encode_images(pixels[i:i + chunk].to(device).float() / 255)
                        for i in range(0, len(pixels), chunk)])
        expected = tuple(getattr(base, "sample_shape", x0.shape[1:]))
        if tuple(x0.shape[1:]) != expected:
            raise ValueError(f"pairs' images ({pixels.shape[2]}x{pixels.shape[3]}) encode to {tuple(x0.shape[1:])}, "
                             f"but the model samples {expected}")
        prompts = [p.prompt for p in pick] * 2
        M = len(pick)
        return PairBatch(prompts=prompts, pixels=pixels.contiguous(), x0=x0, cond=base.encode_prompts(prompts),
                         uncond=self._uncond(base, prompts), chosen=torch.arange(M), rejected=torch.arange(M, 2 * M),
                         schedule=base.schedule, info={"pairs": float(M)}, source_pairs=pick)

    # -- update plan -----------------------------------------------------------------------------
    def _draw(self, batch: PairBatch, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``t [n]``, noise ``[n, ...]`` and prompt dropout ``[n]`` from the runtime's generator (exact resume)."""
        t = sample_timesteps(batch.schedule, n, generator, self.cfg.timestep_sampling, self.cfg.t_min, self.cfg.t_max)
        noise = torch.randn((n, *batch.x0.shape[1:]), generator=generator)
        f = self.cfg.uncond_fraction
        dropped = torch.rand(n, generator=generator) < f if f > 0 else torch.zeros(n, dtype=torch.bool)
        return t.to(batch.x0.device), noise.to(batch.x0.device), dropped

    def minibatches(self, batch: PairBatch, generator: torch.Generator) -> Iterator[list[PairMicroBatch]]:
        """Pairs in random order, ``steps_per_epoch`` chunks; a pair's two samples share ``t`` and noise.
        Each pair enters ``timesteps_per_pair`` times with its own draws; the micro-batches cut the
        rows (pair x draw), so both images of a pair at several ``t`` share one forward pass."""
        M = len(batch.chosen)
        if M == 0:  # every prompt tied: nothing to learn from this epoch
            return
        perm = torch.randperm(M, generator=generator)
        for chunk in perm.chunk(min(self.cfg.steps_per_epoch, M)):
            yield [self._micro(batch, sel, generator)
                   for sel in chunk.repeat(self.cfg.timesteps_per_pair).split(self.cfg.micro_batch_size)]

    def _micro(self, batch: PairBatch, sel: Tensor, generator: torch.Generator) -> PairMicroBatch:
        """The micro-batch of pair rows ``sel`` (a pair may appear once per draw): chosen half, then
        rejected half, each row's two images sharing ``t`` and noise."""
        t, noise, dropped = self._draw(batch, len(sel), generator)
        idx = torch.cat([batch.chosen[sel], batch.rejected[sel]])
        return PairMicroBatch(batch, idx, torch.cat([t, t]), torch.cat([noise, noise]),
                              dropped=torch.cat([dropped, dropped]))

    # -- loss ----------------------------------------------------------------------------------------
    def errors(self, model, micro: PairMicroBatch, *, reference: bool = False, reduce: bool = True) -> Tensor:
        """Per-sample denoising errors of the policy (or, without gradient, of the reference);
        ``reduce=False``: the residuals ``prediction - target`` (``[n, ...]``)."""
        b, w = micro.batch, self.cfg.train_guidance_scale
        x0, cond = b.x0[micro.idx], cond_index(b.cond, micro.idx)
        uncond = None if b.uncond is None else cond_index(b.uncond, micro.idx)
        if micro.dropped is not None and micro.dropped.any():  # CFG dropout: these see the empty prompt
            cond = cond_map(lambda c, u: torch.where(micro.dropped.to(c.device).view(-1, *[1] * (c.ndim - 1)), u, c),
                            cond, uncond)
        kw = {"schedule": model_schedule(model), "prediction_type": model_prediction_type(model),
              "error_space": self.cfg.error_space, "reduce": reduce}

        def err(m):
            return denoising_error(lambda x_t, t, c: guided_prediction(m, x_t, t, c, uncond, w), x0, micro.t,
                                   micro.noise, cond, **kw)

        return self.reference(err) if reference else err(model)


class DiffusionDPO(PairedPreference):
    name = "dpo"

    def loss(self, model, micro: PairMicroBatch) -> tuple[Tensor, dict[str, float]]:
        err_w, err_l = self.errors(model, micro).chunk(2)
        ref_w, ref_l = self.errors(model, micro, reference=True).chunk(2)
        loss, stats = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, self.cfg.beta)
        return loss, {"loss": loss.item(), **stats, "err_w": err_w.mean().item(), "err_l": err_l.mean().item()}


class DiffusionKTO(PairedPreference):
    """Unpaired: the chosen / desirable and rejected / undesirable samples are shuffled together."""

    name = "kto"

    def select(self, rewards: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
        thr = self.cfg.desirable_threshold
        if thr is None:
            return super().select(rewards, group)
        ok = torch.isfinite(rewards)
        return torch.nonzero(ok & (rewards >= thr)).flatten(), torch.nonzero(ok & (rewards < thr)).flatten()

    def minibatches(self, batch: PairBatch, generator: torch.Generator) -> Iterator[list[PairMicroBatch]]:
        idx = torch.cat([batch.chosen, batch.rejected])
        desirable = torch.cat([torch.ones(len(batch.chosen), dtype=torch.bool),
                               torch.zeros(len(batch.rejected), dtype=torch.bool)])
        if len(idx) == 0:
            return
        perm = torch.randperm(len(idx), generator=generator)
        for chunk in perm.chunk(min(self.cfg.steps_per_epoch, len(idx))):
            micros = []
            for sel in chunk.repeat(self.cfg.timesteps_per_pair).split(2 * self.cfg.micro_batch_size):  # as a pair
                t, noise, dropped = self._draw(batch, len(sel), generator)
                micros.append(PairMicroBatch(batch, idx[sel], t, noise, desirable[sel], dropped))
            yield micros

    def loss(self, model, micro: PairMicroBatch) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        err = self.errors(model, micro)
        ref = self.errors(model, micro, reference=True)
        loss, stats = diffusion_kto_loss(err, ref, micro.desirable.to(err.device), cfg.beta, cfg.lambda_d,
                                         cfg.lambda_u)
        return loss, {"loss": loss.item(), **stats, "desirable_frac": micro.desirable.float().mean().item()}


class MaPO(PairedPreference):
    """Reference-free: the runtime builds no reference model (``MaPOConfig.beta`` is 0) and this
    class refuses one."""

    name = "mapo"
    uses_reference = False

    def loss(self, model, micro: PairMicroBatch) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        err_w, err_l = self.errors(model, micro).chunk(2)
        loss, stats = mapo_loss(err_w, err_l, cfg.beta_mapo, cfg.gamma, cfg.num_timesteps)
        return loss, {"loss": loss.item(), **stats, "err_w": err_w.mean().item(), "err_l": err_l.mean().item()}


PRESETS: dict[str, tuple[type, type, dict]] = {
    "dpo": (DPOConfig, DiffusionDPO, {}),
    "kto": (KTOConfig, DiffusionKTO, {}),
    "mapo": (MaPOConfig, MaPO, {}),
}
