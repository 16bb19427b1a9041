"""Diffusion-SDPO (Fu et al. 2025, "Diffusion-SDPO: Safeguarded Direct Preference Optimization for
Diffusion Models").

Diffusion-DPO's gradient is ``c (grad L^w - grad L^l)`` with ``c = beta T w(t) sigmoid(-margin) > 0``
(``L^w``, ``L^l``: the winner's and the loser's denoising errors): widening the margin may raise
*both* errors, and the winner degrades with the loser. SDPO scales the loser's gradient by

    lambda = min(1, (1 - mu) ||g_w||^2 / <g_w, g_l>)   if <g_w, g_l> > 0,   else 1

so that the update ``-(g_w - lambda g_l)`` satisfies ``<-(g_w - lambda g_l), g_w> <= -mu ||g_w||^2``:
to first order the winner's error does not rise (``mu`` in [0, 1] is the safety margin; the
authors use 0.9). ``g_w``, ``g_l`` are the *output-space* gradients of the batch-mean winner and
loser errors (the paper's approximation: the network's Jacobian is taken as shared by the two
branches), i.e. the residuals ``prediction - target`` up to one common factor, so
``lambda = (1 - mu) sum r_w^2 / sum r_w r_l`` over the micro-batch. ``lambda`` carries no gradient
and leaves the loss value unchanged: only the loser's gradient is scaled,
``L^l -> sg(L^l) + lambda (L^l - sg(L^l))`` inside Diffusion-DPO's margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_range
from .preference import DPO_WEIGHT, DiffusionDPO, DPOConfig, PairMicroBatch


def sdpo_scale(res_w: Tensor, res_l: Tensor, mu: float) -> Tensor:
    """The safeguard ``lambda`` (a scalar in ``[0, 1]``) from the winner's and loser's residuals ``[B, ...]``."""
    g_w, g_l = res_w.detach().float().flatten(), res_l.detach().float().flatten()
    num, den = (1 - mu) * g_w.pow(2).sum(), (g_w * g_l).sum()
    cap = num / den.clamp_min(1e-12)
    return torch.where(den > 0, cap.clamp(0, 1), torch.ones_like(cap))


def sdpo_loss(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float,
              lam: Tensor | float) -> tuple[Tensor, dict[str, float]]:
    """Diffusion-DPO's loss with the loser's gradient scaled by ``lam`` (its value is DPO's)."""
    err_l_scaled = err_l.detach() + lam * (err_l - err_l.detach())
    margin = -beta * DPO_WEIGHT * ((err_w - ref_err_w) - (err_l_scaled - ref_err_l))
    loss = -F.logsigmoid(margin).mean()
    return loss, {"reward_margin": margin.mean().item(), "implicit_acc": (margin > 0).float().mean().item(),
                  "loser_scale": float(lam)}


@dataclass
class SDPOConfig(DPOConfig):
    mu: float = 0.9  # mu: the winner-preserving margin of the safeguard (the authors' 0.9)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("mu", self.mu, 0, 1)


class DiffusionSDPO(DiffusionDPO):
    name = "sdpo"

    def loss(self, model, micro: PairMicroBatch) -> tuple[Tensor, dict[str, float]]:
        res = self.errors(model, micro, reduce=False)
        err_w, err_l = res.pow(2).mean(dim=tuple(range(1, res.ndim))).chunk(2)
        res_w, res_l = res.chunk(2)
        lam = sdpo_scale(res_w, res_l, self.cfg.mu)
        ref_w, ref_l = self.errors(model, micro, reference=True).chunk(2)
        loss, stats = sdpo_loss(err_w, err_l, ref_w, ref_l, self.cfg.beta, lam)
        return loss, {"loss": loss.item(), **stats, "err_w": err_w.mean().item(), "err_l": err_l.mean().item()}


PRESETS: dict[str, tuple[type, type, dict]] = {"sdpo": (SDPOConfig, DiffusionSDPO, {})}
