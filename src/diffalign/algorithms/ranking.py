"""Plackett-Luce preference optimisation on ranked lists (``ranking_dpo``).

Ranking-based preference optimisation from implicit user feedback (Diffusion-DRO, 2025,
"Ranking-based Preference Optimization for Diffusion Models from Implicit User Feedback") casts
preference learning as ranking several images of a prompt, not only a pair. diffalign's form of
that idea is the Plackett-Luce generalisation of Diffusion-DPO's loss (the listwise DPO of
Rafailov et al. 2023, Appendix A.3): with the implicit reward of each image of a list ranked
``x^(1) > x^(2) > ... > x^(K)`` (same prompt, same ``t`` and noise),

    r_k = -beta T w(t) (||e - e_theta(x^(k)_t)||^2 - ||e - e_ref(x^(k)_t)||^2),
    L = -sum_{k=1}^{K-1} log( exp(r_k) / sum_{j=k}^{K} exp(r_j) ),

which for ``K = 2`` is exactly Diffusion-DPO's ``-log sigmoid(r_1 - r_2)``. (Diffusion-DRO's own
objective -- a denoising loss on expert images against online negatives, from inverse RL -- is a
different loss; it is not what this file implements.)

Lists: ``source: reference`` / ``policy`` rank the ``group_size`` samples of each prompt by the
training reward; samples that tie an earlier one are dropped (a ranking needs a strict order),
and a list needs a best-worst gap above ``min_margin``. ``source: file`` gives lists of two (the
pairs), where the loss is Diffusion-DPO's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .preference import DPO_WEIGHT, DiffusionDPO, DPOConfig, PairBatch, PairMicroBatch


def plackett_luce_loss(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """``-log P(order)`` under Plackett-Luce for rewards ``[M, K]`` listed best first; ``mask`` marks
    the real items of each list (padding after them). Returns ``[M]``."""
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    r = rewards.masked_fill(~mask, float("-inf"))
    tail = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)  # log sum_{j >= k} exp(r_j)
    last = mask & ~torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)  # the last item picks nothing
    terms = torch.where(mask & ~last, r - tail, torch.zeros_like(r))
    return -terms.sum(-1)


def ranking_dpo_loss(err: Tensor, ref_err: Tensor, beta: float, mask: Tensor | None = None
                     ) -> tuple[Tensor, dict[str, float]]:
    """Plackett-Luce loss on implicit rewards from errors ``[M, K]`` (best first); see the module doc."""
    r = -beta * DPO_WEIGHT * (err - ref_err)
    loss = plackett_luce_loss(r, mask).mean()
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else mask
    adjacent = m[:, 1:] & m[:, :-1]
    ordered = ((r[:, :-1] > r[:, 1:]) & adjacent).sum() / adjacent.sum().clamp_min(1)
    return loss, {"implicit_order_acc": ordered.item(), "list_len": m.sum(-1).float().mean().item()}


def ranked_lists(rewards: Tensor, group: Tensor, min_margin: float) -> tuple[Tensor, Tensor]:
    """Per group, its samples by decreasing reward with ties to an earlier one dropped: ``lists [M, K]``
    (padded with the list's last item) and ``mask [M, K]``."""
    lists = []
    for g in group.unique():
        idx = torch.nonzero((group == g) & torch.isfinite(rewards)).flatten()
        if len(idx) < 2:
            continue
        idx = idx[torch.argsort(rewards[idx], descending=True, stable=True)]
        keep = torch.cat([torch.tensor([True]), rewards[idx][1:] < rewards[idx][:-1]])
        idx = idx[keep]
        if len(idx) >= 2 and rewards[idx[0]] - rewards[idx[-1]] > min_margin:
            lists.append(idx)
    if not lists:
        return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.bool)
    K = max(len(x) for x in lists)
    out = torch.stack([torch.cat([x, x[-1:].expand(K - len(x))]) for x in lists])
    mask = torch.stack([torch.arange(K) < len(x) for x in lists])
    return out, mask


@dataclass
class RankedBatch(PairBatch):
    lists: Tensor | None = None  # [M, K] sample indices, best first
    mask: Tensor | None = None  # [M, K] real items


@dataclass
class RankedMicroBatch(PairMicroBatch):
    mask: Tensor | None = None  # [m, K]


class RankingDPO(DiffusionDPO):
    name = "ranking_dpo"

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> RankedBatch:
        b = super().collect(model, prompts, epoch=epoch, seed=seed)
        if self.cfg.source == "file":
            lists, mask = torch.stack([b.chosen, b.rejected], 1), torch.ones(len(b.chosen), 2, dtype=torch.bool)
        else:
            group = torch.arange(len(prompts)).repeat_interleave(self.cfg.group_size)
            lists, mask = ranked_lists(b.rewards, group, self.cfg.min_margin)
            b.chosen, b.rejected = lists[:, 0], lists.gather(1, (mask.sum(1, keepdim=True) - 1)).flatten()
            b.info["pairs"] = float(len(lists))
            b.info["list_len"] = mask.sum(1).float().mean().item() if len(lists) else 0.0
        return RankedBatch(**vars(b), lists=lists, mask=mask)

    def _micro(self, batch: RankedBatch, sel: Tensor, generator: torch.Generator) -> RankedMicroBatch:
        """Lists ``sel`` (``batch.chosen`` holds their first items); one ``t`` and noise per list, shared by its items."""
        K = batch.lists.shape[1]
        t, noise, dropped = self._draw(batch, len(sel), generator)
        return RankedMicroBatch(batch, batch.lists[sel].flatten(), t.repeat_interleave(K),
                                noise.repeat_interleave(K, dim=0), dropped=dropped.repeat_interleave(K),
                                mask=batch.mask[sel])

    def loss(self, model, micro: RankedMicroBatch) -> tuple[Tensor, dict[str, float]]:
        shape = micro.mask.shape
        err = self.errors(model, micro).view(shape)
        ref = self.errors(model, micro, reference=True).view(shape)
        loss, stats = ranking_dpo_loss(err, ref, self.cfg.beta, micro.mask.to(err.device))
        return loss, {"loss": loss.item(), **stats}


PRESETS: dict[str, tuple[type, type, dict]] = {"ranking_dpo": (DPOConfig, RankingDPO, {"group_size": 4})}
