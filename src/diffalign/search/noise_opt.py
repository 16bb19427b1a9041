"""Noise optimisation for differentiable rewards: ReNO, DNO and a MIRA-style image-space KL.

All three hold the model fixed and run gradient ascent on the *noise* that the (deterministic or
stochastic) sampler turns into an image, ``max_z r(G_theta(z, c)) - regularisers``, back-
propagating through every sampling step. Each iteration costs one differentiable sample
(``num_steps`` NFE forward; the backward pass is reported as ``trace["backward_nfe"]``). The
first iteration is the plain sample from the seed's noise; the returned image is the best
iterate under the reward (so the search never returns worse than where it started).

- **ReNO** (Eyring, Karthik, Roth, Dosovitskiy & Akata 2024, "ReNO: Enhancing One-step
  Text-to-Image Models through Reward-based Noise Optimization"): optimise the initial noise
  ``epsilon`` of a one-/few-step sampler with SGD + Nesterov momentum and gradient-norm clipping,
  regularised by the negative log-likelihood of its norm under the chi distribution with
  ``d`` degrees of freedom, ``K(epsilon) = -log p_chi_d(||epsilon||)``, which keeps ``epsilon``
  on the Gaussian shell ``||epsilon|| ~ sqrt(d)``.
- **DNO** (Tang, Peng, Tang, Hong, Wang & Chang 2024, "Inference-Time Alignment of Diffusion
  Models with Direct Noise Optimization"): optimise *all* the noise the sampler injects
  (``x_T`` and the per-step noise of an SDE sampler) with Adam, with the *probability
  regularisation* against out-of-distribution reward hacking: under ``z ~ N(0, I)`` a random
  permutation of ``z`` cut into ``m`` blocks of ``k`` coordinates has a sample mean
  ``mu ~ N(0, I/m)`` with ``||mu|| <= sqrt(k/m) + t`` except with probability ``exp(-m t^2/2)``,
  and singular values of ``blocks / sqrt(m)`` within ``1 +- (sqrt(k/m) + t)`` except with
  probability ``2 exp(-m t^2/2)`` (Davidson-Szarek); the regulariser is the negative log of these
  tail bounds at the observed excesses, ``m/2 (t_mean^2 + t_cov^2)``, averaged over fresh
  permutations each iteration -- zero for typical Gaussian noise, growing quadratically outside.
- **MIRA-style KL** (2025, "MIRA: Towards Mitigating Reward Hacking in Inference-Time
  Alignment of T2I Diffusion Models"): noise-space regularisers do not stop the
  *image* drifting, so add an image-space surrogate of ``KL(p_z || p_z0)`` against the frozen
  model's own output from the initial noise, ``||x_0(z) - x_0(z_0)||^2 / 2`` per dimension (the
  KL of two unit-variance Gaussians centred on the two images). The paper's surrogate is built
  from diffusion scores along the trajectory; this simplification keeps its image-space anchor.
  :func:`mira` enables it by default; ``kl_weight`` adds it to ReNO and DNO too.

A reward with ``differentiable = False`` raises ``ValueError`` naming the method and the reward.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..config import check_range
from ..core.sampling import sample
from .base import (Engine, SearchResult, candidate_generator, draw, expand_prompts, finish, get_reward,
                   method_generator, per_image_budget, require_differentiable, resolve_settings)


def chi_nll(z: Tensor) -> Tensor:
    """``-log p_chi_d(||z||)`` per row of ``z [N, ...]``, ``d`` = elements per row (ReNO's norm
    regulariser); minimal at ``||z|| = sqrt(d - 1)``."""
    d = z[0].numel()
    r = z.flatten(1).norm(dim=1).clamp_min(1e-8)
    return -((d - 1) * torch.log(r) - r**2 / 2 - (d / 2 - 1) * math.log(2) - math.lgamma(d / 2))


def dno_probability_regularizer(z: Tensor, block: int = 16, generator: torch.Generator | None = None,
                                permutations: int = 1) -> Tensor:
    """DNO's probability regulariser per row of ``z [N, ...]`` (see the module docstring):
    ``m/2 (relu(||mu|| - sqrt(k/m))^2 + relu(dev - sqrt(k/m))^2)`` with ``dev`` the largest
    deviation of a singular value of ``blocks / sqrt(m)`` from 1, averaged over random
    permutations. About 0 for Gaussian noise."""
    flat = z.flatten(1)
    N, D = flat.shape
    k = block
    m = D // k
    if m < k:
        raise ValueError(f"dno regulariser: {D} noise coordinates make fewer than {k} blocks of {k}; "
                         f"use a smaller block")
    tol = math.sqrt(k / m)
    total = flat.new_zeros(N)
    for _ in range(permutations):
        perm = torch.randperm(D, generator=generator)[: m * k].to(flat.device)
        blocks = flat[:, perm].view(N, m, k)
        t_mean = torch.relu(blocks.mean(1).norm(dim=1) - tol)
        sv = torch.linalg.svdvals(blocks / math.sqrt(m))
        dev = torch.maximum(sv.max(1).values - 1, 1 - sv.min(1).values)
        t_cov = torch.relu(dev - tol)
        total = total + m / 2 * (t_mean**2 + t_cov**2)
    return total / permutations


def image_kl(x0: Tensor, x0_ref: Tensor) -> Tensor:
    """MIRA-style image-space KL surrogate per row: ``mean((x0 - x0_ref)^2) / 2``."""
    return 0.5 * (x0 - x0_ref).flatten(1).pow(2).mean(1)


def _optimise(method: str, model: Any, prompts: Sequence[str], reward: Any, *, budget: int,
              num_images_per_prompt: int, all_noise: bool, optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
              grad_clip: float | None, norm_weight: float, prob_weight: float, prob_block: int, kl_weight: float,
              iterations: int | None, sampler: str | None, num_steps: int | None, guidance_scale: float | None,
              eta: float | None, seed: int, checkpoint: bool) -> SearchResult:
    reward = get_reward(reward)
    require_differentiable(reward, method)
    for name, v in (("norm_weight", norm_weight), ("prob_weight", prob_weight), ("kl_weight", kl_weight)):
        check_range(name, v, 0, None)
    if grad_clip is not None:
        check_range("grad_clip", grad_clip, 0, None, lo_open=True)
    image_prompts, seeds = expand_prompts(prompts, num_images_per_prompt, seed)
    s = resolve_settings(model, sampler, num_steps, guidance_scale, eta, stochastic=all_noise and sampler is None,
                         method=method)
    T, N = s.num_steps, len(image_prompts)
    per = per_image_budget(budget, N, T, method, f"one differentiable {T}-step sample", model=model)
    iters = per // T if iterations is None else check_range("iterations", iterations, 1, per // T, integer=True)
    eng = Engine(model, image_prompts, s, reward, max_batch=10**9)
    gens = [candidate_generator(sd, 0) for sd in seeds]
    mgen = method_generator(seeds[0])
    rows = torch.arange(N)
    steps_noise = all_noise and s.stochastic
    # z: [N, 1 + T (if the step noise is optimised too), *shape]; initial noise first
    z = torch.stack([draw(gens, eng.shape, eng.device) for _ in range(1 + (T if steps_noise else 0))], dim=1)
    z.requires_grad_(True)
    opt = optimizer([z])
    sde_seed = int(torch.randint(0, 2**62, (), generator=mgen))

    def forward(z: Tensor) -> Tensor:
        if steps_noise:  # DNO: every injected noise is a variable
            x = z[:, 0]
            for j in range(T):
                x = eng.step(x, eng.predict(x, j, rows), j, z[:, j + 1])
            return x
        return sample(eng.net, eng.cond, sampler=s.sampler, num_steps=T, guidance_scale=s.guidance_scale,
                      noise=z[:, 0], uncond=eng.uncond, eta=s.eta, grad=True, checkpoint=checkpoint,
                      generator=torch.Generator().manual_seed(sde_seed)).x0

    best_r = torch.full((N,), -math.inf)
    best_x = None
    x_ref, history, backward, recomputed = None, [], 0, 0
    for it in range(iters):
        nfe_before = eng.nfe
        with torch.enable_grad():
            x0 = forward(z)
            r = reward(eng.decode(x0).float(), image_prompts)
        eng.reward_calls += N
        rd = r.detach().float().cpu()
        history.append(rd)
        better = rd > best_r
        best_r = torch.where(better, rd, best_r)
        best_x = x0.detach().clone() if best_x is None else torch.where(
            better.to(x0.device).view(-1, *[1] * (x0.ndim - 1)), x0.detach(), best_x)
        if x_ref is None:
            x_ref = x0.detach()
        if it == iters - 1:
            break
        objective = r
        if norm_weight:
            objective = objective - norm_weight * chi_nll(z[:, 0])
        if prob_weight:
            objective = objective - prob_weight * dno_probability_regularizer(z, prob_block, mgen)
        if kl_weight:
            objective = objective - kl_weight * image_kl(x0, x_ref)
        forward_rows = [c.rows for c in eng.counters]
        (grad,) = torch.autograd.grad(-objective.sum(), [z])
        for c, rows_ in zip(eng.counters, forward_rows):  # checkpointing re-runs the model in the backward
            recomputed += c.rows - rows_
            c.rows = rows_
        backward += eng.nfe - nfe_before
        if grad_clip is not None:  # per image
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            grad = grad * (grad_clip / norm).clamp_max(1.0).view(-1, *[1] * (grad.ndim - 1))
        z.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
    trace = {"iterations": iters, "backward_nfe": backward, "recomputed_rows": recomputed,
             "reward_by_iteration": torch.stack(history),
             "optimised": "all noise" if steps_noise else "initial noise", "norm_weight": norm_weight,
             "prob_weight": prob_weight, "kl_weight": kl_weight,
             "noise_norm": z.detach()[:, 0].flatten(1).norm(dim=1).cpu()}
    return finish(eng, method, budget, best_x, best_r, image_prompts, seeds, trace)


def reno(model: Any, prompts: Sequence[str], reward: Any, *, budget: int, num_images_per_prompt: int = 1,
         lr: float = 1.0, momentum: float = 0.9, grad_clip: float | None = 1.0, norm_weight: float = 0.01,
         kl_weight: float = 0.0, iterations: int | None = None, sampler: str | None = None,
         num_steps: int | None = None, guidance_scale: float | None = None, eta: float | None = None, seed: int = 0,
         checkpoint: bool = False) -> SearchResult:
    """ReNO: gradient ascent on the initial noise through ``core.sampling.sample(grad=True)`` (use
    a few ``num_steps`` for a ReNO-style one-/few-step generator), SGD with Nesterov momentum,
    per-image gradient-norm clipping and the chi norm regulariser (``norm_weight``).
    ``iterations`` defaults to ``budget // (N * num_steps)``; the reward must be differentiable.
    With a stochastic sampler the per-step noise is held fixed across iterations (one generator
    for the batch); :func:`dno` optimises it instead.

    trace: ``iterations``, ``backward_nfe``, ``reward_by_iteration [iters, N]``, ``noise_norm``.
    """
    check_range("lr", lr, 0, None, lo_open=True)
    check_range("momentum", momentum, 0, 1, hi_open=True)
    return _optimise("reno", model, prompts, reward, budget=budget, num_images_per_prompt=num_images_per_prompt,
                     all_noise=False, optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum,
                                                                          nesterov=momentum > 0),
                     grad_clip=grad_clip, norm_weight=norm_weight, prob_weight=0.0, prob_block=16,
                     kl_weight=kl_weight, iterations=iterations, sampler=sampler, num_steps=num_steps,
                     guidance_scale=guidance_scale, eta=eta, seed=seed, checkpoint=checkpoint)


def dno(model: Any, prompts: Sequence[str], reward: Any, *, budget: int, num_images_per_prompt: int = 1,
        lr: float = 0.01, prob_weight: float = 1.0, prob_block: int = 16, kl_weight: float = 0.0,
        grad_clip: float | None = None, iterations: int | None = None, sampler: str | None = None,
        num_steps: int | None = None, guidance_scale: float | None = None, eta: float | None = None,
        seed: int = 0) -> SearchResult:
    """DNO: Adam on every noise the sampler injects (initial and per-step; a deterministic default
    sampler becomes its SDE counterpart, an explicitly deterministic one leaves only the initial
    noise), with the probability regulariser (``prob_weight``, blocks of ``prob_block``).

    trace: as :func:`reno`.
    """
    check_range("lr", lr, 0, None, lo_open=True)
    check_range("prob_block", prob_block, 1, None, integer=True)
    return _optimise("dno", model, prompts, reward, budget=budget, num_images_per_prompt=num_images_per_prompt,
                     all_noise=True, optimizer=lambda p: torch.optim.Adam(p, lr=lr), grad_clip=grad_clip,
                     norm_weight=0.0, prob_weight=prob_weight, prob_block=prob_block, kl_weight=kl_weight,
                     iterations=iterations, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                     eta=eta, seed=seed, checkpoint=False)


def mira(model: Any, prompts: Sequence[str], reward: Any, *, budget: int, num_images_per_prompt: int = 1,
         lr: float = 0.01, kl_weight: float = 10.0, norm_weight: float = 0.0, grad_clip: float | None = None,
         iterations: int | None = None, sampler: str | None = None, num_steps: int | None = None,
         guidance_scale: float | None = None, eta: float | None = None, seed: int = 0,
         checkpoint: bool = False) -> SearchResult:
    """MIRA-style noise optimisation: Adam on the initial noise, objective
    ``r(x_0(z)) - kl_weight * ||x_0(z) - x_0(z_0)||^2 / 2`` (per-dimension mean), the anchor
    ``x_0(z_0)`` being the frozen model's sample from the seed's noise.

    trace: as :func:`reno`.
    """
    check_range("lr", lr, 0, None, lo_open=True)
    return _optimise("mira", model, prompts, reward, budget=budget, num_images_per_prompt=num_images_per_prompt,
                     all_noise=False, optimizer=lambda p: torch.optim.Adam(p, lr=lr), grad_clip=grad_clip,
                     norm_weight=norm_weight, prob_weight=0.0, prob_block=16, kl_weight=kl_weight,
                     iterations=iterations, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                     eta=eta, seed=seed, checkpoint=checkpoint)
