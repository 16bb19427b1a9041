"""GRPO for flow models: Flow-GRPO, Flow-GRPO-Fast, DanceGRPO and MixGRPO as configs of one file.

- **Flow-GRPO** (Liu et al. 2025): sample with the ``flow_sde`` reverse SDE (noise level
  ``a = 0.7``), group-normalised advantages over ``G`` images per prompt, PPO clip with a small
  clip range, KL to the reference model (``beta``), and timestep subsampling.
- **Flow-GRPO-Fast**: SDE (and training) on a short random window of early steps, ODE elsewhere.
- **DanceGRPO** (Xue et al. 2025): the ``dance_sde`` sampler with its noise level ``eta = 0.3``
  and training on a fraction (0.6) of the timesteps.
- **MixGRPO** (Li et al. 2025): a sliding window of SDE steps moving from high to low noise as
  training proceeds; ODE steps outside it, so only the window is trained.
- ``sampler: cps`` selects Coefficients-Preserving Sampling for any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import check_choice, check_positive, check_range
from ._policy_gradient import OnlinePolicyGradient, PolicyGradientConfig
from ._rollout import Batch, group_advantages


@dataclass
class GRPOConfig(PolicyGradientConfig):
    sampler: str = "flow_sde"  # flow_sde (Flow-GRPO), dance_sde (DanceGRPO) or cps
    eta: float = 0.7  # Flow-GRPO's noise level a
    clip_range: float = 1e-4  # Flow-GRPO's epsilon
    beta: float = 0.04  # Flow-GRPO's KL coefficient
    std_normalize: bool = True  # divide by the group's std (False: Dr. GRPO, centring only)
    window_size: int = 0  # stochastic steps per trajectory; 0 = all (Flow-GRPO, DanceGRPO)
    window_mode: str = "fixed"  # fixed (at window_start) | random (Flow-GRPO-Fast) | sliding (MixGRPO)
    window_start: int = 0  # first stochastic step for the fixed window
    window_max_start: int = -1  # last allowed start for random/sliding windows (-1: num_steps - window_size)
    window_shift_every: int = 25  # sliding: epochs between shifts (MixGRPO's tau)
    window_stride: int = 1  # sliding: steps per shift (MixGRPO's s)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("sampler", self.sampler, ["flow_sde", "dance_sde", "cps"])
        check_range("window_size", self.window_size, 0, self.num_steps, integer=True)
        check_choice("window_mode", self.window_mode, ["fixed", "random", "sliding"])
        check_range("window_start", self.window_start, 0, self.num_steps - max(1, self.window_size), integer=True)
        check_range("window_max_start", self.window_max_start, -1, self.num_steps - max(1, self.window_size),
                    integer=True)
        check_positive("window_shift_every", self.window_shift_every, integer=True)
        check_positive("window_stride", self.window_stride, integer=True)


PRESETS: dict[str, dict] = {
    "flow_grpo": {},
    "flow_grpo_fast": {"window_size": 2, "window_mode": "random", "window_max_start": 4},
    "dance_grpo": {"sampler": "dance_sde", "eta": 0.3, "timestep_fraction": 0.6, "beta": 0.0},
    "mix_grpo": {"window_size": 4, "window_mode": "sliding", "beta": 0.0},
}


class GRPO(OnlinePolicyGradient):
    name = "grpo"

    def sde_steps(self, epoch: int, generator: torch.Generator) -> list[int] | None:
        cfg = self.cfg
        if cfg.window_size == 0:
            return None
        max_start = cfg.num_steps - cfg.window_size if cfg.window_max_start < 0 else cfg.window_max_start
        if cfg.window_mode == "fixed":
            start = cfg.window_start
        elif cfg.window_mode == "random":
            start = int(torch.randint(0, max_start + 1, (1,), generator=generator))
        else:  # MixGRPO: the window slides towards low noise, then wraps around
            start = (epoch // cfg.window_shift_every * cfg.window_stride) % (max_start + 1)
        return list(range(start, start + cfg.window_size))

    def advantages(self, batch: Batch) -> Tensor:
        return group_advantages(batch.rewards, batch.group, std=self.cfg.std_normalize)
