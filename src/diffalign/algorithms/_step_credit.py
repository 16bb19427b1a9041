"""Step-level credit for the online policy-gradient methods: branching rollouts, rewards of
intermediate latents, and per-step advantages ``[N, T]``.

Flow-GRPO gives every step of a trajectory the final image's advantage. The methods built on this
module give credit per step instead, from one of two sources:

- **rewards of intermediate latents** (DenseGRPO, TP-GRPO): the reward ``R_j`` of the clean image
  that the latent ``x_{t_j}`` leads to, by a deterministic ODE completion from ``t_j`` to 0 on the
  sampling grid (or every ``stride``-th point of it), or by the one-step Tweedie estimate
  ``x0_hat(x_{t_j})`` (one model call); ``R_T`` is the final reward. The step ``j`` (``x_{t_j} ->
  x_{t_{j+1}}``) then has a reward of its own, e.g. its gain ``R_{j+1} - R_j``;
- **branching** (B2-DiffuRL, G2RPO): the trajectories of a group share one trunk up to a branch
  step and differ only after it, so the differences of their rewards are caused by the steps after
  the branch point.

Per-step advantages normalise each step's rewards within its group (``step_group_advantages``),
the GRPO normaliser applied column by column. Everything here works on this process's rows of an
N-process run: trunks, continuations and completions are functions of the seed and the row, so a
process computes exactly its rows of the one-process batch (``_rollout.sample_rows``).
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Sequence

import torch
from torch import Tensor

from ..core.parametrization import cond_index
from ..core.prompts import negative_prompts
from ..core.sampling import seeded_noise
from ..core.steps import ODE_COUNTERPART
from ._rollout import Batch, Shard, check_whole_groups, group_advantages, safe_reward, sample_rows
from .reward_gradient import one_step_x0

INTERMEDIATE_REWARDS = ("ode", "tweedie")


def encode(model, prompts: list[str], guided: bool) -> tuple[Any, Any]:
    """``(cond, uncond)`` of prompts: the unconditional branch (their negative prompts) only when guided."""
    return model.encode_prompts(prompts), model.encode_prompts(negative_prompts(prompts)) if guided else None


def step_group_advantages(values: Tensor, group: Tensor, *, std: bool = True) -> Tensor:
    """GRPO's group normalisation applied to each column of ``values`` ``[N, T]`` separately:
    ``A[i, j] = (v[i, j] - mean_group v[:, j]) / (std_group v[:, j] + eps)``. NaN entries (a failed
    reward) get 0 and are left out of their group's statistics."""
    return torch.stack([group_advantages(values[:, j], group, std=std) for j in range(values.shape[1])], dim=1)


def completion_grid(t: Tensor, j: int, stride: int) -> Tensor:
    """The time grid an ODE completion from ``x_{t_j}`` follows: every ``stride``-th point of the
    sampling grid ``t`` from ``t_j`` on, ending exactly at ``t = 0`` (G2RPO's granularity)."""
    grid = t[j::stride]
    return grid if grid[-1] == t[-1] else torch.cat([grid, t[-1:]])


@torch.no_grad()
def ode_complete(model, x: Tensor, grid: Tensor, cond: Any, uncond: Any, *, sampler: str, guidance_scale: float,
                 batch_size: int = 64, clip_sample: float = 0.0) -> Tensor:
    """The clean sample the deterministic counterpart of ``sampler`` reaches from ``x`` (the latents
    at ``grid[0]``) along ``grid``; one model evaluation per grid interval and sample."""
    if len(grid) < 2:
        return x
    n = x.shape[0]
    latents, _, _, _ = sample_rows(model, n, slice(0, n), cond, uncond, x, torch.Generator(x.device),
                                   batch_size=batch_size, sampler=ODE_COUNTERPART[sampler],
                                   guidance_scale=guidance_scale, timesteps=grid, sde_steps=[], clip_sample=clip_sample)
    return latents[:, -1]


@torch.no_grad()
def tweedie_x0(model, x: Tensor, t: Tensor, cond: Any, uncond: Any, *, guidance_scale: float,
               batch_size: int = 64) -> Tensor:
    """The one-step estimate ``x0_hat(x_t) = E[x_0 | x_t]`` from the model's prediction at ``t``."""
    return torch.cat([one_step_x0(model, x[s], t, cond_index(cond, s),
                                  None if uncond is None else cond_index(uncond, s), guidance_scale)
                      for s in (slice(i, i + batch_size) for i in range(0, x.shape[0], batch_size))])


@torch.no_grad()
def latent_rewards(model, batch: Batch, reward: Callable, *, mode: str, sampler: str, guidance_scale: float,
                   steps: Collection[int] | None = None, stride: int = 1, batch_size: int = 64,
                   clip_sample: float = 0.0) -> tuple[Tensor, int]:
    """``R [N, T+1]``: the reward of the clean image each latent ``x_{t_j}`` of the batch's trajectories
    leads to -- by ODE completion (``mode="ode"``, on every ``stride``-th grid point) or by the one-step
    Tweedie estimate (``"tweedie"``). ``R[:, T]`` is the final reward. Only the latents in ``steps``
    are scored (default: all); the others are NaN. Returns ``R`` and the number of images scored."""
    if mode not in INTERMEDIATE_REWARDS:
        raise ValueError(f"intermediate_reward must be one of {list(INTERMEDIATE_REWARDS)}, got {mode!r}")
    n, T = batch.latents.shape[0], batch.latents.shape[1] - 1
    out = torch.full((n, T + 1), float("nan"))
    out[:, T] = batch.rewards
    scored = 0
    for j in sorted(set(range(T)) if steps is None else {int(s) for s in steps if s < T}):
        x = batch.latents[:, j]
        if mode == "ode":
            x0 = ode_complete(model, x, completion_grid(batch.t, j, stride), batch.cond, batch.uncond,
                              sampler=sampler, guidance_scale=guidance_scale, batch_size=batch_size,
                              clip_sample=clip_sample)
        else:
            x0 = tweedie_x0(model, x, batch.t[j], batch.cond, batch.uncond, guidance_scale=guidance_scale,
                            batch_size=batch_size)
        out[:, j], _ = safe_reward(reward, model.decode(x0).float(), batch.prompts, group=batch.group)
        scored += n
    return out, scored


def completion_evals(num_steps: int, steps: Collection[int], mode: str, stride: int) -> int:
    """Model evaluations per trajectory that ``latent_rewards`` spends (each guided call counts once)."""
    if mode == "tweedie":
        return len([j for j in steps if j < num_steps])
    return sum(len(range(j, num_steps, stride)) for j in steps if j < num_steps)


@torch.no_grad()
def branch_rollout(model, prompts: list[str], reward: Callable, *, group_size: int, sampler: str, num_steps: int,
                   eta: float | Sequence[float] | None, guidance_scale: float, sde_steps: Collection[int] | None,
                   seed: int, branch_step: int, batch_size: int = 64, clip_sample: float = 0.0,
                   shard: Shard = Shard()) -> Batch:
    """Rollouts that branch: the ``G`` trajectories of each prompt share one trunk ``x_1 -> x_{t_k}``
    (``k = branch_step``; the group's first noise, sampled once per group) and continue independently
    from ``x_{t_k}``. The trunk's steps carry no comparison within the group, so they are marked
    deterministic (``sde_mask`` False, log-prob 0) and never trained; ``sde_steps`` (None: all) say
    which steps are stochastic on both sides of the branch point. With ``branch_step = 0`` this is
    ``rollout(..., shared_noise=True)``: only the start is shared."""
    if not 0 <= branch_step < num_steps:
        raise ValueError(f"branch_step must be in [0, {num_steps}), got {branch_step}")
    G, k = group_size, branch_step
    P, n = len(prompts), len(prompts) * group_size
    all_prompts = [p for p in prompts for _ in range(G)]
    group = torch.arange(P).repeat_interleave(G)
    own = shard.part(n)
    check_whole_groups(reward, own, G)
    own_groups = slice(own.start // G, (own.stop - 1) // G + 1)
    device = next(model.parameters()).device
    cond, uncond = encode(model, all_prompts[own], guidance_scale != 1.0)
    noise = seeded_noise(model.sample_shape, [seed + g * G for g in range(own_groups.start, own_groups.stop)], device)
    t = model.schedule.timesteps(num_steps)
    sde = set(range(num_steps)) if sde_steps is None else {int(s) for s in sde_steps}
    etas = [eta] * num_steps if eta is None or isinstance(eta, (int, float)) else list(eta)
    kw = dict(sampler=sampler, guidance_scale=guidance_scale, clip_sample=clip_sample, batch_size=batch_size)
    if k > 0:  # one trunk per group
        g_cond, g_uncond = encode(model, prompts[own_groups], guidance_scale != 1.0)
        trunk, _, _, _ = sample_rows(model, P, own_groups, g_cond, g_uncond, noise,
                                     torch.Generator(device).manual_seed(seed), timesteps=t[:k + 1],
                                     eta=None if etas[0] is None else etas[:k], sde_steps=[s for s in sde if s < k],
                                     **kw)
    else:
        trunk = noise[:, None]
    rows = torch.arange(own.start, own.stop) // G - own_groups.start
    trunk = trunk[rows.to(trunk.device)]
    cont, cont_lp, _, cont_mask = sample_rows(
        model, n, own, cond, uncond, trunk[:, -1], torch.Generator(device).manual_seed(seed + 1),
        timesteps=t[k:], eta=None if etas[0] is None else etas[k:], sde_steps=[s - k for s in sde if s >= k], **kw)
    latents = torch.cat([trunk[:, :-1], cont], dim=1)
    log_probs = torch.cat([cont_lp.new_zeros(len(cont_lp), k), cont_lp], dim=1)
    sde_mask = torch.cat([torch.zeros(k, dtype=torch.bool), cont_mask])
    images = model.decode(latents[:, -1]).float()
    rewards, n_failed = safe_reward(reward, images, all_prompts[own], group=group[own])
    return Batch(prompts=all_prompts[own], group=group[own], cond=cond, uncond=uncond, latents=latents,
                 log_probs=log_probs, t=t, sde_mask=sde_mask, rewards=rewards, advantages=torch.zeros_like(rewards),
                 valid=~torch.isnan(rewards), images=images.cpu(), info={"reward_failed": float(n_failed)},
                 eta=None if etas[0] is None or isinstance(eta, (int, float)) else torch.as_tensor(etas).float())
