"""DDIM inversion: the deterministic path from a clean sample ``x_0`` up to a noisy ``x_t``.

Deterministic DDIM sampling (Song et al. 2021, Eq. 12 with ``eta = 0``) steps down from ``t'``
to ``t < t'`` with the prediction ``o`` made at ``(x_{t'}, t')``::

    x_t = alpha_t x0_hat(o, x_{t'}) + sigma_t eps_hat(o, x_{t'})

Both estimates are affine in ``(o, x_{t'})`` for every parametrisation, so for a given ``o`` the
step is an affine map of ``x_{t'}`` that :func:`inversion_step` solves for ``x_{t'}``. On an
epsilon model that is the classic DDIM inversion ``x_{t'} = alpha' (x_t - sigma eps) / alpha +
sigma' eps`` (Dhariwal & Nichol 2021; Mokady et al. 2023, "Null-text Inversion"); on a flow
model the Euler step ``x_{t'} = x_t + (t' - t) v``.

Plain inversion takes ``o`` from the prediction at ``(x_t, t')`` -- the approximation
``x_{t'} ~ x_t`` in the model's input (the convention of diffusers' ``DDIMInverseScheduler``; at
``t = 0`` a prediction at time 0 would carry no information). **ReNoise** (Garibi et al. 2024,
"ReNoise: Real Image Inversion Through Iterative Noising") refines it: ``renoise_steps`` times,
predict at the current estimate ``(x_{t'}^{(k)}, t')`` and solve again from ``x_t``; the average
of these predictions is the final ``o``. The iteration's fixed point is exactly the ``x_{t'}``
from which one DDIM step returns to ``x_t``.

Used by InPO, SmPO and Inversion-DPO (``algorithms/inversion_preference.py``), which replace
Diffusion-DPO's random noising of the pair's images by the model's own inverted trajectory.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .parametrization import broadcast_to, guided_prediction, to_x0_eps
from .schedules import Schedule


def inversion_step(x_t: Tensor, out: Tensor, t: Tensor, t_next: Tensor, schedule: Schedule,
                   prediction_type: str) -> Tensor:
    """The ``x_{t'}`` (``t' = t_next > t``, per sample ``[B]``) from which a deterministic DDIM step
    with the prediction ``out`` (the model's own parametrisation) lands on ``x_t``."""
    alpha, sigma = (broadcast_to(v.float(), x_t) for v in schedule.alpha_sigma(t.double()))
    alpha_n, sigma_n = (v.float() for v in schedule.alpha_sigma(t_next.double()))
    # coefficients of x0_hat = a_x x + a_o o and eps_hat = b_x x + b_o o at (alpha', sigma')
    one, zero = torch.ones_like(alpha_n), torch.zeros_like(alpha_n)
    (a_x, b_x), (a_o, b_o) = (to_x0_eps(o, x, alpha_n, sigma_n, prediction_type)
                              for o, x in ((zero, one), (one, zero)))
    c_x = broadcast_to(alpha.flatten() * a_x + sigma.flatten() * b_x, x_t)
    c_o = broadcast_to(alpha.flatten() * a_o + sigma.flatten() * b_o, x_t)
    return (x_t - c_o * out) / c_x


@torch.no_grad()
def ddim_inversion(model: Callable[[Tensor, Tensor, Any], Tensor], x0: Tensor, cond: Any, t_grid: Tensor, *,
                   schedule: Schedule, prediction_type: str, uncond: Any = None, guidance_scale: float = 1.0,
                   renoise_steps: int = 0, return_trajectory: bool = False) -> Tensor:
    """Invert ``x0`` along ``t_grid`` (ascending; ``[K + 1]`` shared or ``[B, K + 1]`` per sample).

    Returns ``x`` at ``t_grid[..., -1]`` (``[B, ...]``), or with ``return_trajectory`` every grid
    point ``[B, K + 1, ...]`` (index 0 is ``x0``). ``t_grid[..., 0]`` is usually 0 (clean data).
    ``renoise_steps``: ReNoise iterations per step (0 = plain DDIM inversion); each costs one more
    model call. Guidance (``guidance_scale``, ``uncond``) as in sampling.
    """
    if renoise_steps < 0:
        raise ValueError(f"renoise_steps must be >= 0, got {renoise_steps}")
    B = x0.shape[0]
    grid = t_grid.to(x0.device, torch.float64)
    grid = grid.expand(B, -1) if grid.ndim == 1 else grid
    if grid.shape[0] != B or grid.shape[1] < 2:
        raise ValueError(f"t_grid must be [K+1] or [B={B}, K+1] with K >= 1, got {tuple(t_grid.shape)}")
    if torch.any(grid[:, 1:] < grid[:, :-1]):
        raise ValueError("t_grid must be ascending (inversion runs from data towards noise)")

    def predict(x: Tensor, t: Tensor) -> Tensor:
        return guided_prediction(model, x, t.float(), cond, uncond, guidance_scale).float()

    x = x0.float()
    path = [x]
    for i in range(grid.shape[1] - 1):
        t, t_next = grid[:, i], grid[:, i + 1]
        out = predict(x, t_next)
        if renoise_steps:
            z, acc = inversion_step(x, out, t, t_next, schedule, prediction_type), torch.zeros_like(out)
            for _ in range(renoise_steps):
                o = predict(z, t_next)
                acc += o
                z = inversion_step(x, o, t, t_next, schedule, prediction_type)
            out = acc / renoise_steps
        x = inversion_step(x, out, t, t_next, schedule, prediction_type)
        if return_trajectory:
            path.append(x)
    return torch.stack(path, dim=1) if return_trajectory else x
