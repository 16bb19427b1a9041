"""Pure sampler steps, one function per sampler, all with the same shape::

    step(x_t, model_output, t, t_prev, *, eta, noise=None, prev_sample=None,
         generator=None, schedule=..., prediction_type=...) -> StepOutput

Time runs from ``t`` down to ``t_prev < t``. Each step is a Gaussian transition
``x_{t_prev} ~ N(mean, std^2)``: with ``prev_sample`` given it is scored instead of drawn
(that is how PPO-style methods recompute log-probs of stored trajectories); otherwise it is
drawn with ``noise`` (a standard normal tensor) or from ``generator``.

``log_prob`` is the Gaussian log-density of ``prev_sample`` averaged over all non-batch
dimensions (the DDPO / Flow-GRPO convention). ``eta`` may be a tensor ``[B]``: a noise level per
row (rows of different steps whose levels differ). A deterministic step (``std == 0``: ODE steps,
or the last step into ``t_prev = 0`` of DDIM/CPS) has ``log_prob = 0``: it adds nothing to the
likelihood of a trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .parametrization import broadcast_to, check_prediction_type, to_x0_eps
from .schedules import FlowSchedule, Schedule

_FLOW = FlowSchedule()
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class StepOutput:
    prev_sample: Tensor  # x_{t_prev}
    mean: Tensor  # mean of the Gaussian transition
    std: Tensor  # its standard deviation, broadcastable to prev_sample ([B, 1, ...] or scalar)
    log_prob: Tensor  # [B], averaged over non-batch dims


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(x; mean, std^2)`` averaged over all non-batch dims; 0 where ``std == 0``.

    Computed in float32 whatever the input dtype (bf16 log-probs make PPO ratios useless).
    """
    x, mean = x.float(), mean.float()
    std = torch.as_tensor(std, device=x.device).float().expand_as(x)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    lp = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * _LOG_2PI
    lp = torch.where(std > 0, lp, torch.zeros_like(lp))
    return lp.mean(dim=tuple(range(1, x.ndim)))


# ----- validation ------------------------------------------------------------------------


def _as_time(t: float | Tensor, x: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(f"{name} must be a scalar or have shape [B={x.shape[0]}], got {tuple(t.shape)}")
    if torch.any((t < 0) | (t > 1)) or torch.any(torch.isnan(t)):
        raise ValueError(f"{name} must be in [0, 1], got {t.flatten()[0].item() if t.ndim else t.item()}")
    return t


def _validate(x_t, model_output, t, t_prev, eta, eta_range, noise, prev_sample, sampler):
    if model_output.shape != x_t.shape:
        raise ValueError(f"model_output shape {tuple(model_output.shape)} != x_t shape {tuple(x_t.shape)}")
    for name, other in (("noise", noise), ("prev_sample", prev_sample)):
        if other is not None and other.shape != x_t.shape:
            raise ValueError(f"{name} shape {tuple(other.shape)} != x_t shape {tuple(x_t.shape)}")
    lo, hi = eta_range
    if isinstance(eta, torch.Tensor):  # one noise level per row (per-step levels of fused rows)
        if eta.ndim > 1 or (eta.ndim == 1 and eta.shape[0] != x_t.shape[0]):
            raise ValueError(f"eta must be a number or have shape [B={x_t.shape[0]}], got {tuple(eta.shape)}")
        bad = eta[(eta < lo) | (eta > hi) | torch.isnan(eta)]
        if len(bad.flatten()):
            raise ValueError(f"eta for {sampler} must be in [{lo}, {hi}], got {bad.flatten()[0].item()}")
    elif not (lo <= eta <= hi):
        raise ValueError(f"eta for {sampler} must be in [{lo}, {hi}], got {eta}")
    t, t_prev = _as_time(t, x_t, "t"), _as_time(t_prev, x_t, "t_prev")
    if torch.any(t_prev >= t):
        raise ValueError(f"t_prev must be < t (time runs from 1 to 0), got t={_first(t)}, t_prev={_first(t_prev)}")
    return t, t_prev


def _first(t: Tensor) -> float:
    return t.flatten()[0].item()


def _finish(x_t, mean, std, noise, prev_sample, generator) -> StepOutput:
    std = broadcast_to(std, x_t)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        prev_sample = mean + std * noise
    return StepOutput(prev_sample, mean, std, gaussian_log_prob(prev_sample.detach(), mean, std))


def _require_flow(schedule: Schedule, sampler: str) -> None:
    if schedule.kind != "flow":
        raise ValueError(f"sampler {sampler!r} needs a flow schedule, got a {schedule.kind!r} schedule; use 'ddim'")


# ----- samplers ----------------------------------------------------------------------------


def _ddim_transition(x0, eps, alpha_prev, sigma_prev, s):
    """``x_prev = alpha' x0 + sqrt(sigma'^2 - s^2) eps + s z``: the DDIM family (Song et al. 2021,
    Eq. 12), shared by ``ddim`` and ``cps`` which differ only in the noise level ``s``."""
    return alpha_prev * x0 + torch.sqrt((sigma_prev**2 - s**2).clamp_min(0)) * eps


def ddim_step(x_t, model_output, t, t_prev, *, eta=0.0, noise=None, prev_sample=None, generator=None,
              schedule: Schedule, prediction_type: str = "epsilon", clip_sample: float = 0.0) -> StepOutput:
    """DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", Eq. 12 and 16).

    ``s = eta * (sigma'/sigma) * sqrt(1 - alpha^2 / alpha'^2)`` (Eq. 16 in abar notation);
    ``eta = 0`` is deterministic DDIM, ``eta = 1`` is DDPM ancestral sampling. Works with any
    schedule; on a flow schedule with ``eta = 0`` it coincides with the Euler step.

    ``clip_sample > 0`` clamps the predicted ``x0`` to ``[-clip_sample, clip_sample]`` and re-derives
    ``eps`` from it, as DDPM's pixel-space sampler does (Ho et al. 2020; diffusers' ``clip_sample``):
    an epsilon model's ``x0 = (x_t - sigma eps) / alpha`` amplifies its error by ``1 / alpha``,
    which is ~150 at the first step of a linear-beta schedule.
    """
    t, t_prev = _validate(x_t, model_output, t, t_prev, eta, (0.0, 1.0), noise, prev_sample, "ddim")
    check_prediction_type(prediction_type)
    alpha, sigma = schedule.alpha_sigma(t)
    alpha_prev, sigma_prev = schedule.alpha_sigma(t_prev)
    x0, eps = to_x0_eps(model_output, x_t, alpha, sigma, prediction_type)
    if clip_sample > 0:
        x0 = x0.clamp(-clip_sample, clip_sample)
        eps = (x_t - broadcast_to(alpha, x_t) * x0) / broadcast_to(sigma, x_t).clamp_min(1e-12)
    s = eta * sigma_prev / sigma.clamp_min(1e-12) * torch.sqrt((1 - alpha**2 / alpha_prev**2).clamp_min(0))
    a_p, s_p, s_b = (broadcast_to(v, x_t) for v in (alpha_prev, sigma_prev, s))
    mean = _ddim_transition(x0, eps, a_p, s_p, s_b)
    return _finish(x_t, mean, s_b, noise, prev_sample, generator)


def cps_step(x_t, model_output, t, t_prev, *, eta=0.7, noise=None, prev_sample=None, generator=None,
             schedule: Schedule = _FLOW, prediction_type: str = "flow") -> StepOutput:
    """Coefficients-Preserving Sampling (Wang & Yu 2025, "Coefficients-Preserving Sampling for
    Reinforcement Learning with Flow Matching"): keep the noise coefficient of ``x_{t'}`` at
    exactly ``t'`` by splitting it between the predicted noise and fresh noise,
    ``x_{t'} = (1 - t') x0 + t' cos(eta pi/2) eps_hat + t' sin(eta pi/2) z``."""
    t, t_prev = _validate(x_t, model_output, t, t_prev, eta, (0.0, 1.0), noise, prev_sample, "cps")
    _require_flow(schedule, "cps")
    x0, eps = to_x0_eps(model_output, x_t, 1 - t, t, prediction_type)
    a_p, s_p = broadcast_to(1 - t_prev, x_t), broadcast_to(t_prev, x_t)
    s = s_p * (math.sin(eta * math.pi / 2) if not isinstance(eta, torch.Tensor)
               else broadcast_to(torch.sin(eta.to(s_p) * math.pi / 2), x_t))
    return _finish(x_t, _ddim_transition(x0, eps, a_p, s_p, s), s, noise, prev_sample, generator)


def flow_ode_step(x_t, model_output, t, t_prev, *, eta=0.0, noise=None, prev_sample=None, generator=None,
                  schedule: Schedule = _FLOW, prediction_type: str = "flow") -> StepOutput:
    """Euler step of the rectified-flow ODE ``dx/dt = v`` (Liu et al. 2022; Lipman et al. 2022):
    ``x_{t'} = x_t + (t' - t) v``. Deterministic; ``eta`` must be 0."""
    t, t_prev = _validate(x_t, model_output, t, t_prev, eta, (0.0, 0.0), noise, prev_sample, "flow_ode")
    _require_flow(schedule, "flow_ode")
    v = _velocity(model_output, x_t, t, prediction_type)
    mean = x_t + broadcast_to(t_prev - t, x_t) * v
    return _finish(x_t, mean, torch.zeros((), device=x_t.device), noise, prev_sample, generator)


def _velocity(model_output, x_t, t, prediction_type):
    if prediction_type == "flow":
        return model_output
    x0, eps = to_x0_eps(model_output, x_t, 1 - t, t, prediction_type)
    return eps - x0


def _marginal_preserving_sde(x_t, model_output, t, t_prev, g, prediction_type, noise, prev_sample, generator):
    """Euler-Maruyama step, backwards in time, of the SDE family that shares the ODE's marginals:
    ``dx = [v - g(t)^2 / 2 * score] dt + g(t) dw`` with ``score = -eps_hat / t`` for the flow
    schedule (Song et al. 2021, "Score-Based Generative Modeling through SDEs", Eq. 6 family)."""
    x0, eps = to_x0_eps(model_output, x_t, 1 - t, t, prediction_type)
    v = eps - x0
    tb, dt, gb = broadcast_to(t, x_t), broadcast_to(t_prev - t, x_t), broadcast_to(g, x_t)
    mean = x_t + (v + gb**2 / (2 * tb) * eps) * dt
    return _finish(x_t, mean, gb * torch.sqrt(-dt), noise, prev_sample, generator)


def flow_sde_step(x_t, model_output, t, t_prev, *, eta=0.7, noise=None, prev_sample=None, generator=None,
                  schedule: Schedule = _FLOW, prediction_type: str = "flow") -> StepOutput:
    """Flow-GRPO's reverse SDE (Liu et al. 2025, "Flow-GRPO", Eq. 8-9):
    ``x_{t+dt} = x_t + [v + sigma_t^2/(2t) (x_t + (1-t) v)] dt + sigma_t sqrt(-dt) eps`` with
    ``sigma_t = a sqrt(t / (1 - t))`` and the noise level ``a = eta`` (paper: 0.7).

    The t = 1 edge: ``sigma_t`` diverges at ``t = 1``, so a step that starts there evaluates the
    noise level at ``t_prev`` instead (the choice of the Flow-GRPO reference implementation,
    which uses the second grid point); every other step uses ``t``.
    """
    t, t_prev = _validate(x_t, model_output, t, t_prev, eta, (0.0, 2.0), noise, prev_sample, "flow_sde")
    _require_flow(schedule, "flow_sde")
    t_noise = torch.where(t >= 1, t_prev, t)
    sigma_t = torch.as_tensor(eta, dtype=t.dtype, device=t.device) * torch.sqrt(t_noise / (1 - t_noise))
    return _marginal_preserving_sde(x_t, model_output, t, t_prev, sigma_t, prediction_type, noise, prev_sample, generator)


def dance_sde_step(x_t, model_output, t, t_prev, *, eta=0.3, noise=None, prev_sample=None, generator=None,
                   schedule: Schedule = _FLOW, prediction_type: str = "flow") -> StepOutput:
    """DanceGRPO's reverse SDE (Xue et al. 2025, "DanceGRPO", Sec. 3.1, after Song et al. 2021):
    ``dz = (u - eps_t^2 / 2 * grad log p(z)) dt + eps_t dw`` with a constant noise level
    ``eps_t = eta`` (paper: 0.3), so ``std = eta * sqrt(t - t_prev)``."""
    t, t_prev = _validate(x_t, model_output, t, t_prev, eta, (0.0, 2.0), noise, prev_sample, "dance_sde")
    _require_flow(schedule, "dance_sde")
    g = torch.as_tensor(eta, dtype=t.dtype, device=t.device) * torch.ones_like(t)
    return _marginal_preserving_sde(x_t, model_output, t, t_prev, g, prediction_type, noise, prev_sample, generator)


StepFn = Callable[..., StepOutput]

SAMPLERS: dict[str, StepFn] = {
    "ddim": ddim_step,
    "flow_ode": flow_ode_step,
    "flow_sde": flow_sde_step,
    "dance_sde": dance_sde_step,
    "cps": cps_step,
}

# The deterministic counterpart of each sampler, used on steps outside ``sde_steps``.
ODE_COUNTERPART = {"ddim": "ddim", "flow_ode": "flow_ode", "flow_sde": "flow_ode", "dance_sde": "flow_ode", "cps": "flow_ode"}
DEFAULT_ETA = {"ddim": 1.0, "flow_ode": 0.0, "flow_sde": 0.7, "dance_sde": 0.3, "cps": 0.7}


def get_step(sampler: str) -> StepFn:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[sampler]
