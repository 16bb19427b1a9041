"""Preference optimisation on the steps of sampling trajectories: D3PO and SPO.

Both sample with the policy's stochastic sampler, so every transition ``x_t -> x_{t'}`` has a
Gaussian log-probability (``core.steps``), and apply DPO to a preferred (w) and a dispreferred
(l) transition, against the frozen reference model::

    L = -log sigmoid(beta [log clip(r^w) - log clip(r^l)]),   r = p_theta(x_{t'} | x_t, c) / p_ref(x_{t'} | x_t, c)

with ``clip`` to ``[1 - eps, 1 + eps]`` as in both authors' implementations (no gradient once a
ratio leaves the interval). Log-probs are averaged over dimensions (the DDPO convention).

- **D3PO** (Yang et al. 2024, "Using Human Feedback to Fine-tune Diffusion Models without Any
  Reward Model"): two trajectories per prompt from the current model, started from the same noise;
  a feedback source (here the training reward; it never enters the loss, only the label) says
  which final image is better, and every step of the better trajectory is preferred to the same
  step of the other. No reward model is trained.
- **SPO** (Liang et al. 2024, "Step-aware Preference Optimization: Aligning Preference with
  Denoising Performance at Each Step"): at every step, ``K`` candidates ``x_{t'}`` are drawn from
  the same ``x_t``; a step-aware preference model ranks them (on the shapes world: a reward of the
  model's predicted ``x_0`` from each candidate); the best and worst form the step's pair if their
  scores differ by more than ``threshold``; the trajectory continues from a random candidate (the
  step-wise resampler), so each step's comparison is independent of the previous ones.
- **IPR** (2025, "Refining Alignment Framework for Diffusion Models with Intermediate-Step Preference
  Ranking"; its method is TailorPO): the preference of two intermediate samples drawn from the same
  ``x_t`` is ranked directly by their own step-wise reward (the reward of each one's predicted
  ``x_0``), not inherited from the final images -- which keeps the DPO gradient pointing the right
  way -- and the trajectory continues from the preferred one. SPO's sampler with
  ``num_candidates: 2, continue_from: best`` (the ``ipr`` preset); TailorPO's optional gradient
  guidance of the pair (TailorPO-G) is not implemented.

Two diffalign options of SPO's sampler (both off by default, i.e. the papers' method):
``t_min`` branches into candidates only at the steps that start at ``t >= t_min`` (the noisy end,
where a shapes-world layout is set; the other steps draw the trajectory's one sample and form no
pair), and ``step_score: rollout`` ranks a candidate by the reward of its deterministic continuation
to ``t = 0`` instead of the reward of its predicted ``x_0`` -- at the noisy end a predicted ``x_0``
is a blur the verifier scores near chance (docs/algorithms/preference.md, "Round 6").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_choice, check_positive, check_range
from ..core.parametrization import cond_cat, cond_index, guided_prediction, to_x0_eps
from ..core.prompts import negative_prompts
from ..core.sampling import seeded_noise
from ..core.steps import SAMPLERS, get_step
from ._policy_gradient import model_prediction_type, model_schedule
from ._rollout import reward_stats, rollout, safe_reward
from ._step_credit import ode_complete
from .preference import best_worst_pairs


def stepwise_dpo_loss(log_prob_w: Tensor, ref_log_prob_w: Tensor, log_prob_l: Tensor, ref_log_prob_l: Tensor,
                      beta: float, clip_range: float) -> tuple[Tensor, dict[str, float]]:
    """``-log sigmoid(beta [log clip(r^w) - log clip(r^l)])`` with ratios clipped to ``[1-eps, 1+eps]``."""
    lo, hi = torch.log1p(torch.tensor(-clip_range)).item(), torch.log1p(torch.tensor(clip_range)).item()
    log_r_w = (log_prob_w - ref_log_prob_w).clamp(lo, hi)
    log_r_l = (log_prob_l - ref_log_prob_l).clamp(lo, hi)
    margin = beta * (log_r_w - log_r_l)
    loss = -F.logsigmoid(margin).mean()
    clipped = ((log_prob_w - ref_log_prob_w).abs() >= hi) | ((log_prob_l - ref_log_prob_l).abs() >= hi)
    return loss, {"reward_margin": margin.mean().item(), "implicit_acc": (margin > 0).float().mean().item(),
                  "clip_frac": clipped.float().mean().item()}


@dataclass
class StepwiseConfig:
    sampler: str = "flow_sde"  # stochastic sampler of the policy
    eta: float = 0.7  # its noise level
    num_steps: int = 10  # T: sampling steps
    guidance_scale: float = 3.0  # CFG scale used by the policy (sampling and training)
    beta: float = 10.0  # beta of the DPO objective on step log-probs (SPO's value)
    clip_range: float = 0.1  # eps: ratios p_theta / p_ref clipped to [1 - eps, 1 + eps]
    prompts_per_epoch: int = 16
    timestep_fraction: float = 1.0  # share of the steps trained on per epoch (D3PO; SPO trains every valid step)
    micro_batch_size: int = 16  # step pairs per forward pass
    steps_per_epoch: int = 1  # optimiser steps per pass
    inner_epochs: int = 1
    clip_sample: float = 0.0  # ddim only: clamp the predicted x0; 0 = off

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, [s for s in SAMPLERS if s != "flow_ode"])
        check_range("eta", self.eta, 0, 2, lo_open=True)
        for name in ("num_steps", "prompts_per_epoch", "micro_batch_size", "steps_per_epoch", "inner_epochs"):
            check_positive(name, getattr(self, name), integer=True)
        check_range("guidance_scale", self.guidance_scale, 0, None)
        check_positive("beta", self.beta)
        check_range("clip_range", self.clip_range, 0, 1, lo_open=True, hi_open=True)
        check_range("timestep_fraction", self.timestep_fraction, 0, 1, lo_open=True)
        check_range("clip_sample", self.clip_sample, 0, None)
        if self.clip_sample and self.sampler != "ddim":
            raise ValueError(f"clip_sample applies to the 'ddim' sampler only, got sampler {self.sampler!r}")


@dataclass
class D3POConfig(StepwiseConfig):
    beta: float = 0.1  # D3PO's beta
    group_size: int = 2  # trajectories per prompt (D3PO: a pair; more: best vs worst)
    shared_noise: bool = True  # the trajectories of a prompt start from the same noise
    min_margin: float = 0.0  # reward gap a pair needs; smaller gaps are ties and skipped

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("group_size", self.group_size, 2, None, integer=True)
        check_range("min_margin", self.min_margin, 0, None)


@dataclass
class SPOConfig(StepwiseConfig):
    num_candidates: int = 4  # K: candidates x_{t'} drawn from each x_t
    threshold: float = 0.1  # score gap a step pair needs (SPO's compare threshold)
    step_reward: str = ""  # registry name of the step-aware preference (on the predicted x0); "" = the training reward
    continue_from: str = "random"  # the candidate the trajectory continues from: random (SPO) | best (IPR / TailorPO)
    step_score: str = "x0_hat"  # what a candidate is ranked on: x0_hat (the papers) | rollout (its ODE continuation)
    t_min: float = 0.0  # candidates and pairs only at steps starting at t >= t_min (below: one sample, no pair)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("num_candidates", self.num_candidates, 2, None, integer=True)
        check_range("threshold", self.threshold, 0, None)
        check_choice("continue_from", self.continue_from, ["random", "best"])
        check_choice("step_score", self.step_score, ["x0_hat", "rollout"])
        check_range("t_min", self.t_min, 0, 1, hi_open=True)


@dataclass
class StepPairBatch:
    """Step pairs ``(x_t^w -> x^w, x_t^l -> x^l)`` at step ``step`` of the grid ``t``, plus the final samples."""

    prompts: list[str]  # [N] prompt of each final sample
    images: Tensor  # [N, 3, H, W] final samples (held-out rewards are scored on these)
    rewards: Tensor  # [N] training reward of the final samples
    cond: Any  # [N] encoded prompts
    uncond: Any  # [N] encoded empty prompt (None without guidance)
    t: Tensor  # [T+1] time grid
    owner: Tensor  # [Q] sample whose prompt each step pair belongs to
    step: Tensor  # [Q] step index j (t[j] -> t[j+1])
    x_t_w: Tensor  # [Q, ...]
    x_w: Tensor  # [Q, ...]
    x_t_l: Tensor | None  # [Q, ...]; None when both transitions leave the same state (SPO)
    x_l: Tensor  # [Q, ...]
    info: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class StepMicroBatch:
    batch: StepPairBatch
    idx: Tensor  # step-pair indices


class StepwisePreference:
    name = "stepwise"
    samples_with_policy = True  # rollouts run the trained weights without gradient (LoRA may be merged)

    def __init__(self, cfg: StepwiseConfig, *, reward: Callable, reference: Callable | None = None):
        if reference is None:
            raise ValueError(f"{self.name} needs a reference model (beta={cfg.beta})")
        self.cfg, self.reward, self.reference = cfg, reward, reference
        self.step_fn = get_step(cfg.sampler)
        self.step_kw = {"clip_sample": cfg.clip_sample} if cfg.clip_sample else {}

    def minibatches(self, batch: StepPairBatch, generator: torch.Generator) -> Iterator[list[StepMicroBatch]]:
        """Step pairs of a random ``timestep_fraction`` of the steps, shuffled, in ``steps_per_epoch`` chunks."""
        T = len(batch.t) - 1
        k = max(1, round(self.cfg.timestep_fraction * T))
        steps = torch.randperm(T, generator=generator)[:k]
        keep = torch.nonzero(torch.isin(batch.step, steps)).flatten()
        if len(keep) == 0:
            return
        keep = keep[torch.randperm(len(keep), generator=generator)]
        for chunk in keep.chunk(min(self.cfg.steps_per_epoch, len(keep))):
            yield [StepMicroBatch(batch, idx) for idx in chunk.split(self.cfg.micro_batch_size)]

    def _log_probs(self, m, b: StepPairBatch, q: Tensor, schedule, prediction_type) -> tuple[Tensor, Tensor]:
        """Log-probs of the preferred and dispreferred transitions under model ``m``."""
        cfg = self.cfg
        cond = cond_index(b.cond, b.owner[q])
        uncond = None if b.uncond is None else cond_index(b.uncond, b.owner[q])
        t, t_prev = b.t[b.step[q]].to(b.x_w.device), b.t[b.step[q] + 1].to(b.x_w.device)
        kw = {"eta": cfg.eta, "schedule": schedule, "prediction_type": prediction_type, **self.step_kw}
        x_t_w, x_w, x_l = b.x_t_w[q], b.x_w[q], b.x_l[q]
        if b.x_t_l is None:  # one evaluation scores both transitions
            out = guided_prediction(m, x_t_w, t.float(), cond, uncond, cfg.guidance_scale)
            return (self.step_fn(x_t_w, out, t, t_prev, prev_sample=x_w, **kw).log_prob,
                    self.step_fn(x_t_w, out, t, t_prev, prev_sample=x_l, **kw).log_prob)
        x_t = torch.cat([x_t_w, b.x_t_l[q]])
        tt, tp = torch.cat([t, t]), torch.cat([t_prev, t_prev])
        out = guided_prediction(m, x_t, tt.float(), cond_cat(cond, cond),
                                None if uncond is None else cond_cat(uncond, uncond), cfg.guidance_scale)
        lp = self.step_fn(x_t, out, tt, tp, prev_sample=torch.cat([x_w, x_l]), **kw).log_prob
        return lp.chunk(2)

    def loss(self, model, micro: StepMicroBatch) -> tuple[Tensor, dict[str, float]]:
        schedule, ptype = model_schedule(model), model_prediction_type(model)
        lp_w, lp_l = self._log_probs(model, micro.batch, micro.idx, schedule, ptype)
        ref_w, ref_l = self.reference(lambda m: self._log_probs(m, micro.batch, micro.idx, schedule, ptype))
        loss, stats = stepwise_dpo_loss(lp_w, ref_w, lp_l, ref_l, self.cfg.beta, self.cfg.clip_range)
        return loss, {"loss": loss.item(), **stats}


class D3PO(StepwisePreference):
    name = "d3po"

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> StepPairBatch:
        cfg = self.cfg
        b = rollout(model, prompts, self.reward, group_size=cfg.group_size, sampler=cfg.sampler,
                    num_steps=cfg.num_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale, sde_steps=None,
                    seed=seed, clip_sample=cfg.clip_sample, shared_noise=cfg.shared_noise)
        w, l = best_worst_pairs(b.rewards, b.group, cfg.min_margin)
        T = cfg.num_steps
        steps = torch.arange(T).repeat(len(w))
        w_rep, l_rep = w.repeat_interleave(T), l.repeat_interleave(T)
        return StepPairBatch(
            prompts=b.prompts, images=b.images, rewards=b.rewards, cond=b.cond, uncond=b.uncond, t=b.t,
            owner=w_rep, step=steps, x_t_w=b.latents[w_rep, steps], x_w=b.latents[w_rep, steps + 1],
            x_t_l=b.latents[l_rep, steps], x_l=b.latents[l_rep, steps + 1],
            info={**reward_stats(b), "pairs": float(len(w)), "reward_failed": b.info["reward_failed"]})


class SPO(StepwisePreference):
    name = "spo"

    def __init__(self, cfg: SPOConfig, *, reward: Callable, reference: Callable | None = None):
        super().__init__(cfg, reward=reward, reference=reference)
        if cfg.step_reward:
            from .. import rewards

            self.step_reward = rewards.get(cfg.step_reward)
        else:
            self.step_reward = reward

    def score_candidates(self, model, cand: Tensor, t_prev: Tensor, cond_k: Any, uncond_k: Any,
                         prompts: list[str]) -> tuple[Tensor, int]:
        """Step-aware preference scores ``[K N]`` of the candidates: the step reward of each one's
        predicted ``x0`` (at the last step the candidate is the image), and the failure count."""
        if t_prev > 0:
            a, s = model_schedule(model).alpha_sigma(t_prev)
            out_c = guided_prediction(model, cand, t_prev.float().expand(len(cand)).to(cand.device), cond_k, uncond_k,
                                      self.cfg.guidance_scale)
            x0_hat = to_x0_eps(out_c, cand, a.float(), s.float(), model_prediction_type(model))[0]
        else:
            x0_hat = cand
        return safe_reward(self.step_reward, model.decode(x0_hat).float(), prompts)

    def rollout_scores(self, model, cand: Tensor, j: int, ts: Tensor, cond_k: Any, uncond_k: Any,
                       prompts: list[str]) -> tuple[Tensor, int]:
        """``step_score: rollout``: the step reward of each candidate's deterministic continuation (the
        ODE counterpart of the sampler, at the policy's guidance, from ``t[j + 1]`` to 0) and the
        failure count."""
        cfg = self.cfg
        y = ode_complete(model, cand, ts[j + 1:], cond_k, uncond_k, sampler=cfg.sampler,
                         guidance_scale=cfg.guidance_scale, clip_sample=cfg.clip_sample)
        return safe_reward(self.step_reward, model.decode(y).float(), prompts)

    def pair_ok(self, gap: Tensor, t_prev: Tensor) -> Tensor:
        """Which of the step's best-worst gaps ``[N]`` form a pair."""
        return torch.isfinite(gap) & (gap > self.cfg.threshold)

    @torch.no_grad()
    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> StepPairBatch:
        """SPO's sampler: K candidates per step, ranked on their predicted x0; the trajectory goes on
        from a random candidate (SPO) or the best one (``continue_from: best``, IPR)."""
        cfg, K, N = self.cfg, self.cfg.num_candidates, len(prompts)
        schedule, ptype = model_schedule(model), model_prediction_type(model)
        device = next(model.parameters()).device
        gen = torch.Generator(device).manual_seed(seed)
        pick = torch.Generator().manual_seed(seed + 1)
        cond = model.encode_prompts(prompts)
        uncond = model.encode_prompts(negative_prompts(prompts)) if cfg.guidance_scale != 1.0 else None
        cond_k = cond_cat(*[cond] * K)
        uncond_k = None if uncond is None else cond_cat(*[uncond] * K)
        ts = schedule.timesteps(cfg.num_steps)
        window = ts[:-1] >= cfg.t_min - 1e-9  # steps that branch into candidates
        x = seeded_noise(model.sample_shape, [seed + i for i in range(N)], device)
        kw = {"eta": cfg.eta, "schedule": schedule, "prediction_type": ptype, **self.step_kw}
        rows: dict[str, list] = {k: [] for k in ("owner", "step", "x_t", "x_w", "x_l")}
        n_failed, gaps = 0, []
        for j in range(cfg.num_steps):
            t, t_prev = ts[j], ts[j + 1]
            out = guided_prediction(model, x, t.float().expand(N).to(device), cond, uncond, cfg.guidance_scale)
            if not window[j]:  # below the window: the trajectory's own step, no candidates
                x = self.step_fn(x, out, t, t_prev, generator=gen, **kw).prev_sample
                continue
            x_rep, out_rep = torch.cat([x] * K), torch.cat([out] * K)  # candidate k of sample i at k * N + i
            cand = self.step_fn(x_rep, out_rep, t, t_prev, generator=gen, **kw).prev_sample
            if cfg.step_score == "rollout":
                scores, failed = self.rollout_scores(model, cand, j, ts, cond_k, uncond_k, prompts * K)
            else:
                scores, failed = self.score_candidates(model, cand, t_prev, cond_k, uncond_k, prompts * K)
            n_failed += failed
            scores = scores.view(K, N)
            best, worst = scores.nan_to_num(-float("inf")).argmax(0), scores.nan_to_num(float("inf")).argmin(0)
            gap = scores.gather(0, best[None])[0] - scores.gather(0, worst[None])[0]
            ok = torch.nonzero(self.pair_ok(gap, t_prev)).flatten()
            gaps.append(torch.nan_to_num(gap).mean().item())
            cand = cand.view(K, N, *cand.shape[1:])
            rows["owner"].append(ok)
            rows["step"].append(torch.full((len(ok),), j, dtype=torch.long))
            rows["x_t"].append(x[ok])
            rows["x_w"].append(cand[best[ok].to(device), ok.to(device)])
            rows["x_l"].append(cand[worst[ok].to(device), ok.to(device)])
            follow = best if cfg.continue_from == "best" else torch.randint(0, K, (N,), generator=pick)
            x = cand[follow.to(device), torch.arange(N, device=device)]
        images = model.decode(x).float()
        final, failed = safe_reward(self.reward, images, prompts)
        r = final[torch.isfinite(final)]
        cat = {k: torch.cat(v) for k, v in rows.items()}
        return StepPairBatch(
            prompts=list(prompts), images=images.cpu(), rewards=final, cond=cond, uncond=uncond, t=ts,
            owner=cat["owner"], step=cat["step"], x_t_w=cat["x_t"], x_w=cat["x_w"], x_t_l=None, x_l=cat["x_l"],
            info={"reward_mean": r.mean().item() if len(r) else float("nan"), "pairs": float(len(cat["step"])),
                  "step_score_gap": sum(gaps) / len(gaps), "reward_failed": float(n_failed + failed)})


PRESETS: dict[str, tuple[type, type, dict]] = {
    "d3po": (D3POConfig, D3PO, {}),
    "spo": (SPOConfig, SPO, {}),
    "ipr": (SPOConfig, SPO, {"num_candidates": 2, "continue_from": "best"}),
}
