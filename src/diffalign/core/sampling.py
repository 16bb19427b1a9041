"""The sampling loop: a time grid, a model, and one step function per grid interval.

``sample`` is the one loop every part of diffalign uses (evaluation, rollouts, search,
reward-gradient methods). It records per-step log-probs and, on request, the whole
trajectory so that PPO-style methods can re-score it later.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Collection, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from .parametrization import check_prediction_type, guided_prediction
from .prompts import negative_prompts
from .schedules import Schedule
from .steps import DEFAULT_ETA, ODE_COUNTERPART, get_step


@runtime_checkable
class Denoiser(Protocol):
    """Anything diffalign trains or samples from.

    ``__call__(x_t, t, cond)`` returns a prediction of type ``prediction_type`` for a batch
    ``x_t`` at times ``t`` (float tensor ``[B]`` in ``[0, 1]``). ``schedule`` is the noise
    schedule the model was trained with; ``encode_prompts`` turns prompts into ``cond``.
    """

    prediction_type: str
    schedule: Schedule

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor: ...

    def encode_prompts(self, prompts: list[str]) -> Any: ...


@dataclass
class Trajectory:
    x0: Tensor  # final sample [B, ...]
    latents: Tensor | None  # [B, T+1, ...] from x_1 (noise) to x_0, if return_trajectory
    log_probs: Tensor  # [B, T] per-step log-prob of the step taken (0 for deterministic steps)
    t: Tensor  # [T+1] time grid, float64, from 1 to 0
    sde_mask: Tensor  # [T] bool, True where the step was stochastic


def time_grid(model: Denoiser, num_steps: int, schedule: Schedule | None = None) -> Tensor:
    return (schedule or model.schedule).timesteps(num_steps)


def _grad_steps(grad: bool | Collection[int], num_steps: int) -> set[int]:
    if isinstance(grad, bool):
        return set(range(num_steps)) if grad else set()
    steps = set(int(i) for i in grad)
    bad = [i for i in steps if not 0 <= i < num_steps]
    if bad:
        raise ValueError(f"grad step indices must be in [0, {num_steps}), got {sorted(bad)}")
    return steps


def sample(
    model: Denoiser,
    cond: Any,
    *,
    sampler: str = "flow_ode",
    num_steps: int = 10,
    guidance_scale: float = 1.0,
    noise: Tensor,
    uncond: Any = None,
    eta: float | Sequence[float] | Tensor | None = None,
    sde_steps: Collection[int] | None = None,
    return_trajectory: bool = False,
    grad: bool | Collection[int] = False,
    generator: torch.Generator | None = None,
    schedule: Schedule | None = None,
    checkpoint: bool = False,
    clip_sample: float = 0.0,
    negative_model: Any = None,
    timesteps: Tensor | None = None,
) -> Trajectory:
    """Sample from ``model`` starting at ``noise`` (``x_1``).

    sampler: one of ``ddim``, ``flow_ode``, ``flow_sde``, ``dance_sde``, ``cps``.
    eta: the sampler's noise level (default per sampler: ddim 1.0, flow_sde 0.7, dance_sde 0.3, cps 0.7);
        a sequence of ``num_steps`` values gives each step its own (DenseGRPO's per-step calibration).
    sde_steps: indices of the steps that use ``sampler``; the others use its deterministic
        counterpart (MixGRPO's sliding window, Flow-GRPO-Fast). ``None``: every step.
    guidance_scale / uncond: classifier-free guidance; ``uncond`` is the model's encoding of the
        unconditional (empty) prompt, needed when ``guidance_scale != 1``.
    grad: ``False`` (no graph), ``True`` (backprop through every step), or the indices of the
        steps to backprop through (DRaFT-K); the other steps run without a graph.
    checkpoint: recompute each graph-carrying model call in the backward pass
        (``torch.utils.checkpoint``), so memory grows with the number of grad steps only mildly.
    generator: source of the stochastic steps' noise.
    clip_sample: ``ddim`` only: clamp the predicted x0 to ``[-clip_sample, clip_sample]`` (pixel-space
        epsilon models); 0 = off.
    negative_model: a denoiser for the unconditional branch of guidance (Diffusion-NPO); see
        :func:`~diffalign.core.parametrization.guided_prediction`.
    timesteps: an explicit decreasing time grid ``[S + 1]`` that replaces the schedule's grid (and
        ``num_steps = S``): ``noise`` is then the latent at ``timesteps[0]``, so a trajectory can be
        continued from any intermediate latent, on any sub-grid (branching rollouts, ODE completions).
    """
    step_fn = get_step(sampler)
    ode_fn = get_step(ODE_COUNTERPART[sampler])
    step_kw = {}
    if clip_sample:
        if sampler != "ddim":
            raise ValueError(f"clip_sample applies to the 'ddim' sampler only, got sampler {sampler!r}")
        step_kw["clip_sample"] = clip_sample
    check_prediction_type(model.prediction_type)
    schedule = schedule or model.schedule
    if timesteps is None:
        ts = time_grid(model, num_steps, schedule)
    else:
        ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
        if len(ts) < 2 or torch.any(ts[1:] >= ts[:-1]):
            raise ValueError(f"timesteps must be a decreasing grid of at least 2 times, got {ts.tolist()}")
        num_steps = len(ts) - 1
    etas = _per_step_eta(DEFAULT_ETA[sampler] if eta is None else eta, num_steps)
    sde_set = set(range(num_steps)) if sde_steps is None else {int(i) for i in sde_steps}
    if any(not 0 <= i < num_steps for i in sde_set):
        raise ValueError(f"sde_steps must be indices in [0, {num_steps}), got {sorted(sde_set)}")
    grad_set = _grad_steps(grad, num_steps)
    B = noise.shape[0]
    device = noise.device

    x = noise
    latents = [x] if return_trajectory else None
    log_probs = torch.zeros(B, num_steps, device=device, dtype=torch.float32)
    sde_mask = torch.tensor([i in sde_set for i in range(num_steps)])
    for i in range(num_steps):
        t, t_prev = ts[i], ts[i + 1]
        stochastic = i in sde_set and (sampler != "ddim" or etas[i] > 0)
        fn = step_fn if i in sde_set else ode_fn
        step_eta = etas[i] if i in sde_set else 0.0
        with contextlib.nullcontext() if i in grad_set else torch.no_grad():
            if i not in grad_set:
                x = x.detach()
            t_batch = t.to(device=device, dtype=torch.float32).expand(B)
            if checkpoint and i in grad_set:
                out = torch.utils.checkpoint.checkpoint(
                    guided_prediction, model, x, t_batch, cond, uncond, guidance_scale, negative_model,
                    use_reentrant=False
                )
            else:
                out = guided_prediction(model, x, t_batch, cond, uncond, guidance_scale, negative_model)
            step = fn(x, out, t, t_prev, eta=step_eta, generator=generator, schedule=schedule,
                      prediction_type=model.prediction_type, **step_kw)
        x = step.prev_sample
        if stochastic and not bool((step.std > 0).any()):  # DDIM / CPS into t = 0: no noise, no policy step
            stochastic = False
        if stochastic:
            log_probs[:, i] = step.log_prob.detach()
        sde_mask[i] = stochastic
        if return_trajectory:
            latents.append(x.detach())
    return Trajectory(
        x0=x,
        latents=torch.stack(latents, dim=1) if return_trajectory else None,
        log_probs=log_probs,
        t=ts,
        sde_mask=sde_mask,
    )


def _per_step_eta(eta: float | Sequence[float] | Tensor, num_steps: int) -> list[float]:
    """One noise level per step from a scalar or a sequence of ``num_steps`` values."""
    if isinstance(eta, (int, float)):
        return [float(eta)] * num_steps
    etas = [float(e) for e in torch.as_tensor(eta).flatten().tolist()]
    if len(etas) != num_steps:
        raise ValueError(f"eta must be a number or {num_steps} per-step values, got {len(etas)} values")
    return etas


def seeded_noise(shape: tuple[int, ...], seeds: list[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Initial noise ``[len(seeds), *shape]``, image ``i`` drawn from its own seed, so an image
    depends only on its seed -- not on the batch it was drawn in -- and models can be compared
    on identical noise."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
        device=device, dtype=dtype)


def generate(model: Any, prompts: list[str], seeds: list[int], *, sampler: str = "flow_ode", num_steps: int = 10,
             guidance_scale: float = 1.0, eta: float | None = None, batch_size: int = 256,
             clip_sample: float = 0.0, negative_model: Any = None) -> Tensor:
    """Prompts -> images ``[B, 3, H, W]`` in ``[0, 1]`` for a model with ``encode_prompts``,
    ``sample_shape`` and ``decode`` (the shapes models and the diffusers adapter). No gradients.

    Stochastic samplers draw their per-step noise from a generator seeded with ``seeds[0]`` of
    each batch, so the call is deterministic for given seeds and batch size. ``negative_model``
    computes the unconditional branch of guidance (Diffusion-NPO), fed the same empty prompt.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; need one seed per image")
    device = next(model.parameters()).device if hasattr(model, "parameters") else torch.device("cpu")
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            p, s = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
            cond = model.encode_prompts(p)
            uncond = model.encode_prompts(negative_prompts(p)) if guidance_scale != 1.0 else None
            noise = seeded_noise(model.sample_shape, s, device)
            traj = sample(model, cond, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                          noise=noise, uncond=uncond, eta=eta, generator=torch.Generator(device).manual_seed(s[0]),
                          clip_sample=clip_sample, negative_model=negative_model)
            out.append(model.decode(traj.x0).float().cpu())
    return torch.cat(out)
