"""Noise schedules: frozen, stateless maps ``step index -> t`` and ``t -> (alpha, sigma)``.

One convention everywhere: ``x_t = alpha(t) * x0 + sigma(t) * eps`` with ``t`` continuous
in ``[0, 1]`` and ``t = 1`` pure noise (or, for VP schedules, the noisiest training step).

Unlike a diffusers scheduler a schedule holds no state, so any step can be recomputed from
``(x_t, t, t_prev)`` alone -- which is what every RL method needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

SCHEDULE_KINDS = ("flow", "vp")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _as_tensor(t: float | Tensor) -> Tensor:
    return t if isinstance(t, Tensor) else torch.tensor(float(t), dtype=torch.float64)


def _check_t(t: Tensor, name: str = "t") -> None:
    if t.numel() and (torch.any(t < 0) or torch.any(t > 1) or torch.any(torch.isnan(t))):
        bad = t[(t < 0) | (t > 1) | torch.isnan(t)].flatten()[0].item()
        raise ValueError(f"{name} must be in [0, 1], got {bad}")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 time shift (Esser et al. 2024, "Scaling Rectified Flow Transformers", Eq. 23):
    ``t' = shift * t / (1 + (shift - 1) * t)``; ``shift > 1`` spends more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow / flow matching: ``alpha = 1 - t``, ``sigma = t``, velocity ``v = eps - x0``.

    shift: SD3's resolution-dependent time shift (1.0 = none; SD3 uses 3.0).
    sigma_min: if > 0, the grid is ``shift(linspace(1, sigma_min, N))`` followed by 0, which is
        diffusers' ``FlowMatchEulerDiscreteScheduler`` grid when given that scheduler's
        ``sigma_min`` attribute (which it stores already shifted, ``shift(1 / T)``); if 0 the grid
        is ``shift(linspace(1, 0, N + 1))`` (the Flow-GRPO convention).
    shift_terminal: if > 0, the ``N`` nonzero grid points after shifting are stretched so the last
        of them is ``shift_terminal`` (``1 - t`` scaled by a constant; LTX-Video's and Qwen-Image's
        schedules, diffusers' ``stretch_shift_to_terminal``); 0 ends the grid as above.
    """

    shift: float = 1.0
    sigma_min: float = 0.0
    kind: str = "flow"
    shift_terminal: float = 0.0

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not 0 <= self.sigma_min < 1:
            raise ValueError(f"sigma_min must be in [0, 1), got {self.sigma_min}")
        if self.kind != "flow":
            raise ValueError(f"FlowSchedule.kind must be 'flow', got {self.kind!r}")
        if not 0 <= self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1), got {self.shift_terminal}")

    def timesteps(self, num_steps: int) -> Tensor:
        """Time grid ``[num_steps + 1]`` from 1 (noise) down to 0 (data), float64."""
        _check_num_steps(num_steps)
        if self.sigma_min > 0:
            base = torch.linspace(1.0, self.sigma_min, num_steps, dtype=torch.float64)
        else:
            base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        grid = shift_time(base, self.shift)
        if self.shift_terminal > 0 and num_steps > 1:
            one_minus = 1 - grid
            grid = 1 - one_minus * (1 - self.shift_terminal) / one_minus[-1]
        return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])

    def alpha_sigma(self, t: float | Tensor) -> tuple[Tensor, Tensor]:
        t = _as_tensor(t)
        _check_t(t)
        return 1 - t, t


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


@dataclass(frozen=True)
class VPSchedule:
    """Variance-preserving diffusion (DDPM, Ho et al. 2020; Stable Diffusion):
    ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``.

    The discrete training steps ``k = 0 .. T-1`` sit at ``t_k = (k + 1) / T`` and ``t = 0`` is
    clean data (``abar = 1``). Between grid points ``log abar`` is interpolated linearly, so
    ``abar(t)`` is exact on the grid (diffusers parity) and continuous in between.

    beta_schedule: ``linear`` (DDPM), ``scaled_linear`` (Stable Diffusion: linear in sqrt(beta)),
        ``squaredcos_cap_v2`` (cosine, Nichol & Dhariwal 2021).
    snr_shift_scale: ``s``: ``abar <- abar / (s + (1 - s) abar)``, which divides the SNR by ``s``
        at every step (CogVideoX's "SNR shift following SD3"); 1 = none.
    zero_terminal_snr: rescale ``sqrt(abar)`` so the last training step is pure noise (``abar = 0``
        at ``t = 1``; Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
        Flawed", Algorithm 1). Applied after the SNR shift, as CogVideoX does.
    """

    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    kind: str = "vp"
    snr_shift_scale: float = 1.0
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if self.kind != "vp":
            raise ValueError(f"VPSchedule.kind must be 'vp', got {self.kind!r}")
        if not self.snr_shift_scale > 0:
            raise ValueError(f"snr_shift_scale must be > 0, got {self.snr_shift_scale}")

    @cached_property
    def betas(self) -> Tensor:
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float64) ** 2
        # squaredcos_cap_v2: abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), betas capped at 0.999
        s = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.clamp(1 - f[1:] / f[:-1], max=0.999)

    @cached_property
    def alphas_cumprod(self) -> Tensor:
        abar = torch.cumprod(1 - self.betas, dim=0)
        if self.snr_shift_scale != 1.0:
            abar = abar / (self.snr_shift_scale + (1 - self.snr_shift_scale) * abar)
        if self.zero_terminal_snr:
            root = abar.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            abar = ((root - last) * first / (first - last)) ** 2
        return abar

    @cached_property
    def _log_abar_grid(self) -> Tensor:
        # grid point i (i = 0..T) is t = i / T; i = 0 is clean data with abar = 1
        return torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alphas_cumprod)])

    def timestep_to_t(self, k: Tensor | int) -> Tensor:
        """Discrete training step ``k`` (0-based, diffusers convention) to continuous ``t``."""
        return (_as_tensor(k).to(torch.float64) + 1) / self.num_train_timesteps

    def t_to_timestep(self, t: float | Tensor) -> Tensor:
        """Continuous ``t`` to the (fractional) discrete step ``k = t * T - 1``."""
        return _as_tensor(t) * self.num_train_timesteps - 1

    def timesteps(self, num_steps: int) -> Tensor:
        """Uniform ("trailing") grid ``[num_steps + 1]`` from 1 down to 0, float64.

        With ``T = 1000`` and 10 steps this visits the discrete steps 999, 899, ..., 99 and then
        clean data, diffusers' ``timestep_spacing="trailing"`` with ``set_alpha_to_one=True``.
        """
        _check_num_steps(num_steps)
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)

    def log_abar(self, t: float | Tensor) -> Tensor:
        t = _as_tensor(t)
        _check_t(t)
        grid = self._log_abar_grid.to(t.device)
        pos = t.to(torch.float64) * self.num_train_timesteps
        lo = torch.clamp(pos.floor().long(), 0, self.num_train_timesteps - 1)
        w = pos - lo
        a, b = grid[lo], grid[lo + 1]
        out = a * (1 - w) + b * w
        if self.zero_terminal_snr:  # log abar = -inf at t = 1: interpolate abar itself in the last interval
            out = torch.where(torch.isinf(b), torch.log(a.exp() * (1 - w)), out)
        return out.to(t.dtype) if t.is_floating_point() else out

    def alpha_sigma(self, t: float | Tensor) -> tuple[Tensor, Tensor]:
        abar = torch.exp(self.log_abar(t))
        return abar.sqrt(), (1 - abar).clamp_min(0).sqrt()


Schedule = FlowSchedule | VPSchedule


def schedule_from_dict(d: dict) -> Schedule:
    """Build a schedule from its ``asdict`` form (as saved in model configs)."""
    d = dict(d)
    kind = d.get("kind")
    if kind == "flow":
        return FlowSchedule(**d)
    if kind == "vp":
        return VPSchedule(**d)
    raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {kind!r}")


def logit_normal_between(n: int, generator: torch.Generator, t_min: float, t_max: float) -> Tensor:
    """``n`` float64 draws of SD3's logit-normal training density restricted to ``[t_min, t_max]`` by
    inverse-CDF sampling (one ``rand`` of ``n`` from ``generator``)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0)

    def cdf(t: float) -> Tensor:
        t = min(max(t, 1e-6), 1 - 1e-6)
        return normal.cdf(torch.tensor(t / (1 - t), dtype=torch.float64).log())

    lo, hi = cdf(t_min), cdf(t_max)
    return torch.sigmoid(normal.icdf((lo + (hi - lo) * u).clamp(1e-9, 1 - 1e-9)))


def sample_timesteps(schedule: "VPSchedule | FlowSchedule", n: int, generator: torch.Generator, dist: str = "uniform",
                     t_min: float = 0.0, t_max: float = 1.0) -> Tensor:
    """``t [n]``: uniform over a VP schedule's training steps, or uniform / logit-normal on (0, 1);
    ``t_min`` / ``t_max`` restrict either to ``[t_min, t_max]`` (t = 1 is pure noise; VP: the training
    steps whose ``t`` lies there; logit-normal: restricted by inverse-CDF sampling, SD3's density)."""
    full = t_min <= 0.0 and t_max >= 1.0
    if hasattr(schedule, "num_train_timesteps"):
        T = schedule.num_train_timesteps
        lo, hi = (0, T) if full else (max(0, math.ceil(t_min * T) - 1), max(1, math.floor(t_max * T)))
        return schedule.timestep_to_t(torch.randint(lo, max(hi, lo + 1), (n,), generator=generator)).float()
    if dist == "logit_normal":
        if full:
            return torch.sigmoid(torch.randn(n, generator=generator))
        return logit_normal_between(n, generator, t_min, t_max).float()
    u = torch.rand(n, generator=generator)
    return (u if full else t_min + (t_max - t_min) * u).clamp(1e-4, 1 - 1e-4)
