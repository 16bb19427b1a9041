"""Minority-aware Adaptive-DPO (2025, "When Preferences Diverge: Aligning Diffusion
Models with Minority-Aware Adaptive DPO").

Preference data holds *minority* pairs: labels that many people would give the other way round.
Diffusion-DPO learns them as firmly as the rest, which pulls the model away from what most people
prefer. Adaptive-DPO measures per pair how settled its label is and adapts the loss: it learns
consensus pairs more firmly and lets disputed ones go sooner.

diffalign's measure is the agreement of the pair's voters, ``a = votes for chosen / decisive
votes`` in ``[1/2, 1]`` (the majority label is the chosen one), turned into a stability
``s = 2a - 1`` in ``[0, 1]`` (0: split vote, 1: unanimous). The voters are

- the people who labelled the pair on the labelling page: ``diffalign label --export`` writes each
  pair's ``vote_split``, which ``load_pairs`` reads as ``PreferencePair.votes`` (``source: file``);
- and/or a ``panel`` of reward models that vote on each pair (``v = 1`` for the chosen image,
  ``1/2`` on a tie), the training reward's own label counting as one more voter -- how on-policy
  pairs (``source: reference`` / ``policy``) get a disagreement signal.

The loss puts a per-pair margin ``delta = gamma (2 s - 1)`` into Diffusion-DPO::

    L = -log sigmoid(M - delta),   M = -beta T w(t) [(err^w_theta - err^w_ref) - (err^l_theta - err^l_ref)]

A unanimous pair (``s = 1``) must be won by ``gamma`` before its gradient fades (learned more
firmly); a split one (``s = 0``) already counts as won at ``M = -gamma`` (its gradient is smaller
from the start and vanishes early), so a minority label cannot drag the model far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_range
from .balanced_dpo import pair_rows, panel_scores, pairwise_votes
from .preference import DPO_WEIGHT, DiffusionDPO, DPOConfig, PairBatch, PairMicroBatch


def stability(votes_for: Tensor, votes_against: Tensor) -> Tensor:
    """``s = 2a - 1`` with ``a = votes_for / (votes_for + votes_against)``; 1 without decisive votes."""
    total = votes_for + votes_against
    a = torch.where(total > 0, votes_for / total.clamp_min(1e-12), torch.ones_like(total))
    return (2 * a - 1).clamp(0, 1)


def adaptive_dpo_loss(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, s: Tensor, beta: float,
                      gamma: float) -> tuple[Tensor, dict[str, float]]:
    """``-log sigmoid(M - gamma (2 s - 1))`` per pair (module docstring)."""
    margin = -beta * DPO_WEIGHT * ((err_w - ref_err_w) - (err_l - ref_err_l))
    delta = gamma * (2 * s.to(margin) - 1)
    loss = -F.logsigmoid(margin - delta).mean()
    return loss, {"reward_margin": margin.mean().item(), "implicit_acc": (margin > 0).float().mean().item(),
                  "stability": s.float().mean().item(), "disputed_frac": (s < 1).float().mean().item()}


@dataclass
class AdaptiveDPOConfig(DPOConfig):
    gamma: float = 2.0  # gamma: the adaptive margin's scale (margin units)
    panel: list = field(default_factory=list)  # reward registry names that vote on each pair ([] = none)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("gamma", self.gamma, 0, None)
        if not all(isinstance(p, str) for p in self.panel):
            raise ValueError(f"panel must be a list of reward names, got {self.panel!r}")
        if self.source != "file" and not self.panel:
            raise ValueError(f"source {self.source!r}: on-policy pairs have one label each; give a `panel` of "
                             "reward names that vote on them (e.g. [shapes_soft, colorfulness])")


class AdaptiveDPO(DiffusionDPO):
    name = "adaptive_dpo"

    def __init__(self, cfg: AdaptiveDPOConfig, *, reward: Callable, reference=None):
        super().__init__(cfg, reward=reward, reference=reference)
        from .. import rewards

        self.panel = [rewards.get(name) for name in cfg.panel]

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> PairBatch:
        batch = super().collect(model, prompts, epoch=epoch, seed=seed)
        M = len(batch.chosen)
        if batch.source_pairs is not None:  # the labelling export's votes
            split = torch.tensor([p.votes if p.votes is not None else (1, 0, 0) for p in batch.source_pairs],
                                 dtype=torch.float32).view(M, 3)
            pro, con = split[:, 0], split[:, 1]
            if not self.panel and all(p.votes is None for p in batch.source_pairs):
                raise ValueError(f"adaptive_dpo: no pair of {self.cfg.data!r} carries votes (export the labelling "
                                 "database with `diffalign label --export`) and no `panel` is given: there is no "
                                 "disagreement to adapt to")
        else:  # on-policy: the training reward's label is one voter
            pro, con = torch.ones(M), torch.zeros(M)
        if self.panel and M:
            scores, failed = panel_scores(self.panel, batch.images, batch.prompts)
            v = pairwise_votes(scores[batch.chosen], scores[batch.rejected])
            pro, con = pro + v.sum(1), con + (1 - v).sum(1)
            batch.info["panel_failed"] = float(failed)
        batch.stability = stability(pro, con)  # type: ignore[attr-defined]
        if M:
            batch.info["stability"] = batch.stability.mean().item()
        return batch

    def loss(self, model, micro: PairMicroBatch) -> tuple[Tensor, dict[str, float]]:
        err_w, err_l = self.errors(model, micro).chunk(2)
        ref_w, ref_l = self.errors(model, micro, reference=True).chunk(2)
        s = micro.batch.stability[pair_rows(micro.batch, micro.idx[:len(err_w)])]
        loss, stats = adaptive_dpo_loss(err_w, err_l, ref_w, ref_l, s, self.cfg.beta, self.cfg.gamma)
        return loss, {"loss": loss.item(), **stats}


PRESETS: dict[str, tuple[type, type, dict]] = {"adaptive_dpo": (AdaptiveDPOConfig, AdaptiveDPO, {})}
