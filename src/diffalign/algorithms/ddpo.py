"""DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning") for VP /
epsilon models: DDIM sampling with ``eta = 1`` (ancestral), per-prompt reward statistics,
and either the importance-sampled PPO objective (DDPO-IS, ``loss: ppo``) or the score-function
estimator (DDPO-SF, ``loss: reinforce``). ``beta > 0`` adds DPOK's KL regulariser (Fan et al.
2023), the closed-form KL between the policy's and the reference's Gaussian steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..config import check_choice, check_positive
from ._policy_gradient import OnlinePolicyGradient, PolicyGradientConfig
from ._rollout import Batch, PerPromptStatTracker, group_advantages


@dataclass
class DDPOConfig(PolicyGradientConfig):
    sampler: str = "ddim"
    eta: float = 1.0  # DDPO samples with DDIM eta = 1
    clip_range: float = 1e-4  # DDPO's epsilon
    beta: float = 0.0  # DPOK-style KL coefficient (0 = plain DDPO)
    per_prompt_stat_tracking: bool = True  # False: normalise over the whole batch
    stat_buffer_size: int = 32
    stat_min_count: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("sampler", self.sampler, ["ddim"])
        check_positive("stat_buffer_size", self.stat_buffer_size, integer=True)
        check_positive("stat_min_count", self.stat_min_count, integer=True)


PRESETS: dict[str, dict] = {"ddpo": {}, "ddpo_sf": {"loss": "reinforce", "inner_epochs": 1}, "dpok": {"beta": 0.01}}


class DDPO(OnlinePolicyGradient):
    name = "ddpo"

    def __init__(self, cfg: DDPOConfig, **kw):
        super().__init__(cfg, **kw)
        self.tracker = PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)

    def advantages(self, batch: Batch) -> Tensor:
        if self.cfg.per_prompt_stat_tracking:
            return self.tracker.update(batch.prompts, batch.rewards)
        return group_advantages(batch.rewards, batch.group.new_zeros(len(batch)))

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
