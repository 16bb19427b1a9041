"""Self-NPO (Wang et al. 2025, "Self-NPO: Data-Free Diffusion Model Enhancement via Truncated Diffusion
Fine-Tuning").

Diffusion-NPO (``npo.py``) needs preference pairs to train the *negative* model that replaces the
unconditional branch of classifier-free guidance. Self-NPO trains it without any labels, from the
model itself: the negative model learns to produce what the model produces when its sampling is
**truncated** -- a few denoising steps from a noisy latent, then the one-step estimate of the
clean image, which is blurry and poorly detailed: the kind of output guidance should steer away
from. Per sample ``x_0``:

1. noise it to ``x_{t_s}``, ``t_s`` a random point of a ``num_ddim_steps`` DDIM grid;
2. run ``truncation_steps`` DDIM steps of the frozen model (guidance ``solver_guidance_scale``; the
   authors' 0 in diffalign's ``u + w (c - u)`` form: the unconditional prediction) down to ``t_e``
   and take its clean estimate ``x0_hat(x_{t_e})`` as the target;
3. re-noise ``x_{t_e}`` forward to a random ``s in (t_e, 1]``:
   ``x_s = (alpha_s / alpha_e) x_{t_e} + sqrt(sigma_s^2 - (alpha_s sigma_e / alpha_e)^2) z``;
4. ``L = ||x0_theta(x_s, s, c) - x0_hat||^2``: the negative model's clean estimate (from any
   parametrisation) regresses the truncated one.

The target model is the frozen base (the authors use an EMA of the model being trained, started
from the base; diffalign keeps it fixed). The samples are the base model's own
(``source: reference``) or the images of a pairs file, labels unused (``source: file``). As with
Diffusion-NPO, ``RUN/final`` is the negative model: sample the base with it in the unconditional
branch (``generate(..., negative_model=...)``; ``benchmarks/bench_preference.py --npo``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import check_positive, check_range
from ..core.parametrization import broadcast_to, cond_index, guided_prediction, to_x0_eps
from ..core.prompts import negative_prompts
from ..core.steps import ddim_step
from ._policy_gradient import _unwrap, model_prediction_type, model_schedule
from .preference import PairBatch, PairedPreference, PreferenceConfig


def forward_transition(x_e: Tensor, t_e: Tensor, s: Tensor, z: Tensor, schedule) -> Tensor:
    """A draw of ``q(x_s | x_{t_e})`` (``s >= t_e``): ``(alpha_s / alpha_e) x_e + sqrt(sigma_s^2 - (alpha_s sigma_e / alpha_e)^2) z``."""
    a_e, s_e = (broadcast_to(v.float(), x_e) for v in schedule.alpha_sigma(t_e.double()))
    a_s, s_s = (broadcast_to(v.float(), x_e) for v in schedule.alpha_sigma(s.double()))
    ratio = a_s / a_e.clamp_min(1e-6)
    return ratio * x_e + torch.sqrt((s_s**2 - (ratio * s_e) ** 2).clamp_min(0)) * z


@dataclass
class SelfNPOConfig(PreferenceConfig):
    group_size: int = 2  # samples per prompt (all are used; no pairs are formed)
    num_ddim_steps: int = 10  # N: the DDIM grid the start time t_s and the truncated steps live on
    truncation_steps: int = 5  # DDIM steps run before the clean estimate is taken (the authors' 5)
    solver_guidance_scale: float = 0.0  # w of the truncated solver, u + w (c - u): 0 = unconditional (the authors')

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == "policy":
            raise ValueError("self_npo learns from the base model's samples or a file's images: source must be "
                             "'reference' or 'file', got 'policy'")
        check_positive("num_ddim_steps", self.num_ddim_steps, integer=True)
        check_positive("truncation_steps", self.truncation_steps, integer=True)
        check_range("solver_guidance_scale", self.solver_guidance_scale, 0, None)

    @property
    def beta(self) -> float:
        """Seen by the runtime: > 0, so it builds the frozen reference that serves as the target model."""
        return 1.0


@dataclass
class SelfNPOMicroBatch:
    batch: PairBatch
    idx: Tensor  # sample indices
    start: Tensor  # [n] grid index of t_s (0 = t = 1)
    noise: Tensor  # [n, ...] forward noise of x_{t_s}
    renoise: Tensor  # [n, ...] z of the re-noising to s
    u: Tensor  # [n] uniform: s = t_e + (1 - t_e) u


class SelfNPO(PairedPreference):
    name = "self_npo"

    def select(self, rewards: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
        return torch.arange(len(rewards)), torch.zeros(0, dtype=torch.long)  # every sample; no labels

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> PairBatch:
        batch = super().collect(model, prompts, epoch=epoch, seed=seed)
        if self.cfg.source == "file":  # both images of each pair, labels unused
            batch.chosen, batch.rejected = torch.arange(len(batch)), torch.zeros(0, dtype=torch.long)
        if batch.uncond is None and self.cfg.solver_guidance_scale != 1.0:
            batch.uncond = _unwrap(model).encode_prompts(negative_prompts(batch.prompts))
        batch.info["samples"] = float(len(batch.chosen))
        return batch

    def minibatches(self, batch: PairBatch, generator: torch.Generator) -> Iterator[list[SelfNPOMicroBatch]]:
        n = len(batch.chosen)
        if n == 0:
            return
        perm = batch.chosen[torch.randperm(n, generator=generator)]
        for chunk in perm.chunk(min(self.cfg.steps_per_epoch, n)):
            micros = []
            for sel in chunk.repeat(self.cfg.timesteps_per_pair).split(2 * self.cfg.micro_batch_size):
                k, shape = len(sel), (len(sel), *batch.x0.shape[1:])
                micros.append(SelfNPOMicroBatch(
                    batch, sel, torch.randint(0, self.cfg.num_ddim_steps, (k,), generator=generator),
                    torch.randn(shape, generator=generator).to(batch.x0), torch.randn(shape, generator=generator).to(batch.x0),
                    torch.rand(k, generator=generator).clamp(1e-3, 1.0)))
            yield micros

    @torch.no_grad()
    def truncated_target(self, micro: SelfNPOMicroBatch, schedule, ptype) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_{t_e}, t_e, x0_hat)``: the frozen model's truncated solve from ``x_{t_s}``."""
        cfg, b = self.cfg, micro.batch
        grid = schedule.timesteps(cfg.num_ddim_steps).to(b.x0.device)
        cond = cond_index(b.cond, micro.idx)
        uncond = None if b.uncond is None else cond_index(b.uncond, micro.idx)
        w = cfg.solver_guidance_scale
        j = micro.start.to(b.x0.device)
        a_s, s_s = (broadcast_to(v.float(), micro.noise) for v in schedule.alpha_sigma(grid[j]))
        x = a_s * b.x0[micro.idx].float() + s_s * micro.noise.float()
        end = (j + cfg.truncation_steps).clamp(max=cfg.num_ddim_steps)

        def pred(m, x, t):
            return guided_prediction(m, x, t.float(), cond, uncond if w != 1.0 else None, w).float()

        for k in range(cfg.truncation_steps):
            active = j + k < end  # a solve that reached t = 0 stops there
            if not active.any():
                break
            t_now = grid[(j + k).clamp(max=cfg.num_ddim_steps)]
            out = self.reference(lambda m: pred(m, x, t_now))
            a = active
            x = x.clone()
            x[a] = ddim_step(x[a], out[a], t_now[a], grid[j[a] + k + 1], eta=0.0, schedule=schedule,
                             prediction_type=ptype).prev_sample
        t_e = grid[end]
        out = self.reference(lambda m: pred(m, x, t_e.clamp_min(1e-4)))
        a_e, s_e = schedule.alpha_sigma(t_e)
        x0_hat = to_x0_eps(out, x, a_e.float(), s_e.float(), ptype)[0]
        x0_hat = torch.where((t_e == 0).view(-1, *[1] * (x.ndim - 1)), x, x0_hat)  # a finished solve is its own estimate
        return x, t_e, x0_hat

    def loss(self, model, micro: SelfNPOMicroBatch) -> tuple[Tensor, dict[str, float]]:
        schedule, ptype = model_schedule(model), model_prediction_type(model)
        x_e, t_e, target = self.truncated_target(micro, schedule, ptype)
        s = (t_e + (1 - t_e) * micro.u.to(t_e)).clamp(max=1.0)
        x_s = forward_transition(x_e, t_e, s, micro.renoise.float(), schedule)
        out = model(x_s, s.float(), cond_index(micro.batch.cond, micro.idx)).float()
        a, sg = schedule.alpha_sigma(s)
        x0_theta = to_x0_eps(out, x_s, a.float(), sg.float(), ptype)[0]
        loss = (x0_theta - target).pow(2).mean()
        return loss, {"loss": loss.item(), "t_e": t_e.float().mean().item(), "s": s.float().mean().item()}


PRESETS: dict[str, tuple[type, type, dict]] = {"self_npo": (SelfNPOConfig, SelfNPO, {})}
