"""B2-DiffuRL (Hu et al. 2025, "Towards Better Alignment: Training Diffusion Models with Reinforcement
Learning Against Sparse Rewards").

- **Backward progressive training**: training starts on the last steps of the denoising process
  and the trained interval ``[T - L, T)`` grows backwards to the first step as training proceeds,
  ``L(e) = min(T, L_0 + floor(e (T - L_0 + 1) / E))`` at epoch ``e`` (``initial_interval = L_0``,
  ``progressive_epochs = E``); the late steps, whose effect on the final image is direct, are learnt
  first, which eases learning from a sparse reward.
- **Branch-based sampling**: for each prompt one trunk trajectory is sampled up to the start of the
  interval, ``x_1 -> x_{t_k}`` with ``k = T - L``, and ``G`` branches continue from ``x_{t_k}``
  (``_step_credit.branch_rollout``). Comparing samples of the same branch point isolates what the
  steps of the current interval contribute to the final image; the advantage of a branch is its
  reward normalised within the branch group. The paper then keeps, per branch group, the best
  sample if its normalised score is ``>= pos_threshold`` and the worst if it is ``< neg_threshold``
  (``select_extremes``), and trains them with the policy-gradient objective it builds on (here the
  PPO-clipped objective of DDPO / Flow-GRPO on the steps of the interval; trunk steps are shared by
  the whole group and carry no comparison, so they are never trained).

Works with every stochastic sampler (``ddim`` for VP models, ``flow_sde`` / ``dance_sde`` / ``cps``
for flow models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import check_range
from ._policy_gradient import OnlinePolicyGradient, PolicyGradientConfig
from ._rollout import Batch, group_advantages
from ._step_credit import branch_rollout


@dataclass
class B2DiffuRLConfig(PolicyGradientConfig):
    clip_range: float = 1e-4  # PPO's epsilon (DDPO's)
    std_normalize: bool = True  # divide by the branch group's reward std (False: centre only)
    initial_interval: int = 3  # L_0: steps trained (counted from the end) at epoch 0
    progressive_epochs: int = 50  # E: epochs over which the interval grows to all steps
    select_extremes: bool = True  # keep only the best and the worst sample of each branch group
    pos_threshold: float = 0.5  # the best is kept if its normalised advantage is >= this
    neg_threshold: float = -0.5  # the worst is kept if its normalised advantage is < this

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("initial_interval", self.initial_interval, 1, self.num_steps, integer=True)
        check_range("progressive_epochs", self.progressive_epochs, 1, None, integer=True)
        check_range("pos_threshold", self.pos_threshold, 0, None)
        check_range("neg_threshold", self.neg_threshold, None, 0)

    def interval(self, epoch: int) -> int:
        """``L(e)``: the number of trained steps, counted from the end, at epoch ``epoch``."""
        T, L0 = self.num_steps, self.initial_interval
        return min(T, L0 + (epoch * (T - L0 + 1)) // self.progressive_epochs)


def extreme_advantages(adv: Tensor, group: Tensor, pos_threshold: float, neg_threshold: float) -> Tensor:
    """B2-DiffuRL's selection: per group, the best sample's advantage if it is ``>= pos_threshold``
    and the worst's if it is ``< neg_threshold``; every other advantage becomes 0."""
    out = torch.zeros_like(adv)
    for g in group.unique():
        idx = (group == g).nonzero().flatten()
        best, worst = idx[adv[idx].argmax()], idx[adv[idx].argmin()]
        if adv[best] >= pos_threshold:
            out[best] = adv[best]
        if adv[worst] < neg_threshold:
            out[worst] = adv[worst]
    return out


class B2DiffuRL(OnlinePolicyGradient):
    name = "b2_diffurl"

    def sample_batch(self, model, prompts: list[str], *, epoch: int, seed: int) -> Batch:
        cfg = self.cfg
        k = cfg.num_steps - cfg.interval(epoch)
        batch = branch_rollout(model, prompts, self.reward, group_size=cfg.group_size, sampler=cfg.sampler,
                               num_steps=cfg.num_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale, sde_steps=None,
                               seed=seed, branch_step=k, batch_size=cfg.sample_batch_size, shard=self.shard,
                               **self.step_kw)
        P, n = len(prompts), len(batch) * self.shard.world
        batch.info["branch_step"] = float(k)
        batch.info["sampling_evals_per_image"] = (P * k + n * (cfg.num_steps - k)) / n
        return batch

    def advantages(self, batch: Batch) -> Tensor:
        cfg = self.cfg
        adv = group_advantages(batch.rewards, batch.group, std=cfg.std_normalize)
        if cfg.select_extremes:
            adv = extreme_advantages(adv, batch.group, cfg.pos_threshold, cfg.neg_threshold)
        batch.info["selected_frac"] = (adv != 0).float().mean().item()
        return adv


PRESETS: dict[str, dict] = {"b2_diffurl": {}}
