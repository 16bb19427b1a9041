"""Dense-reward Diffusion-DPO (Yang et al. 2024, "A Dense Reward View on Aligning Text-to-Image
Diffusion with Preference").

Diffusion-DPO treats the whole reverse chain as one bandit action: every denoising step of the
winner counts alike. The dense-reward view gives each step its own (implicit) reward and
discounts it with the step's position in the chain, ``gamma^k`` for the ``k``-th step after the
start from noise, so the first, high-noise steps -- where the layout of the image is decided --
weigh most. With Diffusion-DPO's one-``t`` estimate of the sum over steps the loss is

    L = -log sigmoid(-beta T w(t) gamma^{k(t)} [(err^w_theta - err^w_ref) - (err^l_theta - err^l_ref)])

with ``k(t) = (1 - t) num_steps``: ``t = 1`` (pure noise, the first reverse step) has weight 1,
``t = 0`` (the last) ``gamma^num_steps``. ``gamma = 1`` is Diffusion-DPO. The discount lowers the
average weight, so ``beta`` acts ``mean(gamma^k)`` times weaker than in Diffusion-DPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..config import check_positive, check_range
from .preference import DPO_WEIGHT, DiffusionDPO, DPOConfig, PairMicroBatch


def temporal_discount(t: Tensor, gamma: float, num_steps: int) -> Tensor:
    """``gamma^((1 - t) num_steps)``: 1 at the start of the reverse chain (``t = 1``), ``gamma^num_steps`` at its end."""
    return gamma ** ((1 - t.double()) * num_steps)


def dense_reward_dpo_loss(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, t: Tensor,
                          beta: float, gamma: float, num_steps: int) -> tuple[Tensor, dict[str, float]]:
    """Diffusion-DPO with each pair's margin discounted by its timestep (module docstring)."""
    w = temporal_discount(t, gamma, num_steps).to(err_w)
    margin = -beta * DPO_WEIGHT * w * ((err_w - ref_err_w) - (err_l - ref_err_l))
    loss = -F.logsigmoid(margin).mean()
    return loss, {"reward_margin": margin.mean().item(), "implicit_acc": (margin > 0).float().mean().item(),
                  "discount": w.mean().item()}


@dataclass
class DenseRewardDPOConfig(DPOConfig):
    gamma: float = 0.9  # gamma: the per-step temporal discount
    discount_steps: int = 10  # length of the reverse chain the discount counts steps over

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("gamma", self.gamma, 0, 1, lo_open=True)
        check_positive("discount_steps", self.discount_steps, integer=True)


class DenseRewardDPO(DiffusionDPO):
    name = "dense_reward_dpo"

    def loss(self, model, micro: PairMicroBatch) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        err_w, err_l = self.errors(model, micro).chunk(2)
        ref_w, ref_l = self.errors(model, micro, reference=True).chunk(2)
        t = micro.t.chunk(2)[0]
        loss, stats = dense_reward_dpo_loss(err_w, err_l, ref_w, ref_l, t, cfg.beta, cfg.gamma, cfg.discount_steps)
        return loss, {"loss": loss.item(), **stats, "err_w": err_w.mean().item(), "err_l": err_l.mean().item()}


PRESETS: dict[str, tuple[type, type, dict]] = {"dense_reward_dpo": (DenseRewardDPOConfig, DenseRewardDPO, {})}
