"""BalancedDPO (2025, "BalancedDPO: Adaptive Multi-Metric Alignment").

Several metrics ``m = 1..R`` (reward models; with a pairs file, the file's own label is one more)
each vote on a pair ``(a, b)``: ``v_m = 1`` if ``s_m(a) > s_m(b)``, ``0`` if less, ``1/2`` on a
tie. Instead of mixing the rewards, BalancedDPO aggregates in the space of preference
distributions: the consensus ``p = sum_m w_m v_m / sum_m w_m`` is the probability that ``a`` is
preferred, the pair is oriented so that ``p > 1/2`` (``p = 1/2`` is a tie and is skipped), and
Diffusion-DPO's margin ``M`` is trained towards that distribution::

    L = -[ p log sigmoid(M) + (1 - p) log sigmoid(-M) ]

On-policy (``source: reference`` / ``policy``) each prompt's pair is the two of its
``group_size`` samples with the strongest consensus (largest ``|p - 1/2|``, ties broken by the
summed standardised score gaps).

**Adaptive weighting.** The abstract does not fix the rule; diffalign's: the weights follow how
well the policy already satisfies each metric. ``acc_m``, a running mean (``adaptive_momentum``)
of the share of pairs on which the sign of the policy's implicit margin agrees with metric
``m``'s vote, sets ``w_m proportional to w0_m exp(-acc_m / tau)``: a metric the policy lags on gains weight,
the one it satisfies loses it. The running means are part of the run's checkpoint (exact
resume). ``adaptive: false`` keeps the initial weights ``w0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_positive, check_range
from ._rollout import safe_reward
from .preference import DPO_WEIGHT, DiffusionDPO, DPOConfig, PairBatch, PairMicroBatch


# ----- voters ------------------------------------------------------------------------------------------
def panel_scores(rewards: list[Callable], images: Tensor, prompts: list[str]) -> tuple[Tensor, int]:
    """``[N, R]`` scores of the images under each reward (NaN where one failed), and the failure count."""
    cols, failed = [], 0
    for r in rewards:
        s, f = safe_reward(r, images, prompts)
        cols.append(s)
        failed += f
    return torch.stack(cols, dim=1), failed


def pairwise_votes(scores_a: Tensor, scores_b: Tensor) -> Tensor:
    """``v = 1`` where a scores higher, ``0`` where lower, ``1/2`` on a tie or a failed score."""
    v = (scores_a > scores_b).float() + 0.5 * (scores_a == scores_b).float()
    return torch.where(torch.isfinite(scores_a) & torch.isfinite(scores_b), v, torch.full_like(v, 0.5))


def consensus(votes: Tensor, weights: Tensor) -> Tensor:
    """``p = sum_m w_m v_m / sum_m w_m`` for votes ``[M, R]``."""
    w = weights.to(votes)
    return votes @ w / w.sum()


def consensus_pairs(scores: Tensor, group: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per group the pair with the strongest consensus, oriented so that ``p > 1/2``: ``chosen [M]``,
    ``rejected [M]`` and the votes ``[M, R]`` of chosen over rejected. Groups whose every pair ties are skipped."""
    finite = torch.isfinite(scores)
    mu = torch.nanmean(scores.masked_fill(~finite, float("nan")), dim=0)
    sd = torch.sqrt(torch.nanmean((scores - mu).masked_fill(~finite, float("nan")) ** 2, dim=0)).clamp_min(1e-8)
    z = ((scores - mu) / sd).nan_to_num(0.0)
    chosen, rejected, votes = [], [], []
    for g in group.unique():
        best = None
        for a, b in combinations(torch.nonzero(group == g).flatten().tolist(), 2):
            v = pairwise_votes(scores[a], scores[b])
            p = consensus(v[None], weights)[0].item()
            key = (abs(p - 0.5), (z[a] - z[b]).abs().sum().item())
            if p != 0.5 and (best is None or key > best[0]):
                best = (key, (a, b, v) if p > 0.5 else (b, a, 1 - v))
        if best is not None:
            chosen.append(best[1][0])
            rejected.append(best[1][1])
            votes.append(best[1][2])
    if not chosen:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, scores.shape[1])
    return torch.tensor(chosen), torch.tensor(rejected), torch.stack(votes)


def file_pair_votes(batch: PairBatch, panel: list[Callable]) -> tuple[Tensor, int]:
    """Votes ``[M, R + 1]`` of a file batch's chosen over rejected images: each panel reward, then the file's label (1)."""
    scores, failed = panel_scores(panel, batch.images, batch.prompts)
    v = pairwise_votes(scores[batch.chosen], scores[batch.rejected])
    return torch.cat([v, torch.ones(len(v), 1)], dim=1), failed


def soft_label_dpo_loss(margin: Tensor, p: Tensor) -> Tensor:
    """Cross-entropy between the preference distribution ``p`` and ``sigmoid(margin)``."""
    return -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin)).mean()


def pair_rows(batch: PairBatch, idx: Tensor) -> Tensor:
    """Pair number of each chosen sample index in ``idx``."""
    lookup = torch.full((len(batch),), -1, dtype=torch.long)
    lookup[batch.chosen] = torch.arange(len(batch.chosen))
    return lookup[idx.cpu()]


# ----- BalancedDPO ---------------------------------------------------------------------------------------
@dataclass
class BalancedDPOConfig(DPOConfig):
    metrics: list = field(default_factory=lambda: ["shapes", "shapes_soft", "colorfulness"])  # reward registry names
    metric_weights: list = field(default_factory=list)  # w0 per metric ([] = 1 each); with a file, + the label's
    label_weight: float = 1.0  # source file: w0 of the file's own label as a voter
    adaptive: bool = True  # adapt the weights to the policy's per-metric agreement
    adaptive_temperature: float = 0.1  # tau of w ~ w0 exp(-acc / tau)
    adaptive_momentum: float = 0.9  # running mean of acc_m per micro-batch

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.metrics or not all(isinstance(m, str) for m in self.metrics):
            raise ValueError(f"metrics must be a non-empty list of reward names, got {self.metrics!r}")
        if self.metric_weights and len(self.metric_weights) != len(self.metrics):
            raise ValueError(f"metric_weights must give one weight per metric ({len(self.metrics)}), "
                             f"got {len(self.metric_weights)}")
        for i, w in enumerate(self.metric_weights):
            check_positive(f"metric_weights[{i}]", w)
        check_positive("label_weight", self.label_weight)
        check_positive("adaptive_temperature", self.adaptive_temperature)
        check_range("adaptive_momentum", self.adaptive_momentum, 0, 1, hi_open=True)


class BalancedDPO(DiffusionDPO):
    name = "balanced_dpo"

    def __init__(self, cfg: BalancedDPOConfig, *, reward: Callable, reference=None):
        super().__init__(cfg, reward=reward, reference=reference)
        from .. import rewards

        self.panel = [rewards.get(name) for name in cfg.metrics]
        w0 = list(cfg.metric_weights) or [1.0] * len(cfg.metrics)
        if cfg.source == "file":
            w0.append(cfg.label_weight)
        self.w0 = torch.tensor(w0, dtype=torch.float32)
        self.acc = torch.full_like(self.w0, 0.5)  # running per-voter agreement of the policy (chance at start)

    @property
    def voters(self) -> list[str]:
        return list(self.cfg.metrics) + (["label"] if self.cfg.source == "file" else [])

    def weights(self) -> Tensor:
        if not self.cfg.adaptive:
            return self.w0.clone()
        w = self.w0 * torch.exp(-(self.acc - self.acc.max()) / self.cfg.adaptive_temperature)
        return w / w.sum() * self.w0.sum()

    def state_dict(self) -> dict:
        return {"acc": self.acc.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.acc = state["acc"].clone()

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> PairBatch:
        cfg = self.cfg
        batch = super().collect(model, prompts, epoch=epoch, seed=seed)
        if cfg.source == "file":
            votes, failed = file_pair_votes(batch, self.panel)
            p = consensus(votes, self.weights())
            flip = p < 0.5
            batch.chosen, batch.rejected = (torch.where(flip, batch.rejected, batch.chosen),
                                            torch.where(flip, batch.chosen, batch.rejected))
            votes = torch.where(flip[:, None], 1 - votes, votes)
            keep = p != 0.5
            batch.chosen, batch.rejected, votes = batch.chosen[keep], batch.rejected[keep], votes[keep]
            batch.info["label_flipped"] = flip.float().mean().item()
        else:
            scores, failed = panel_scores(self.panel, batch.images, batch.prompts)
            group = torch.arange(len(prompts)).repeat_interleave(cfg.group_size)
            batch.chosen, batch.rejected, votes = consensus_pairs(scores, group, self.weights())
            for name, col in zip(cfg.metrics, scores.T):
                batch.info[f"metric/{name}"] = col[torch.isfinite(col)].mean().item()
        batch.votes = votes  # type: ignore[attr-defined]
        batch.info.update({"pairs": float(len(batch.chosen)), "metric_failed": float(failed)})
        return batch

    def loss(self, model, micro: PairMicroBatch) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        err_w, err_l = self.errors(model, micro).chunk(2)
        ref_w, ref_l = self.errors(model, micro, reference=True).chunk(2)
        margin = -cfg.beta * DPO_WEIGHT * ((err_w - ref_w) - (err_l - ref_l))
        votes = micro.batch.votes[pair_rows(micro.batch, micro.idx[:len(err_w)])].to(margin.device)
        w = self.weights()
        p = consensus(votes, w)
        loss = soft_label_dpo_loss(margin, p)
        with torch.no_grad():  # agreement of the policy's implicit preference with each voter
            agree = torch.where(margin[:, None] > 0, votes, 1 - votes).mean(0).cpu()
            self.acc = cfg.adaptive_momentum * self.acc + (1 - cfg.adaptive_momentum) * agree
        stats = {f"weight/{n}": v.item() for n, v in zip(self.voters, w / w.sum())}
        return loss, {"loss": loss.item(), "reward_margin": margin.mean().item(), "consensus": p.mean().item(),
                      "implicit_acc": (margin > 0).float().mean().item(), **stats}


PRESETS: dict[str, tuple[type, type, dict]] = {"balanced_dpo": (BalancedDPOConfig, BalancedDPO, {})}
