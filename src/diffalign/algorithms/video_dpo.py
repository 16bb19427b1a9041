"""VideoDPO (2025, "VideoDPO: Omni-Preference Alignment for Video Diffusion Generation"), on-policy.

``N`` (``group_size``) samples per prompt are scored on several dimensions -- VideoDPO's visual
quality and text alignment -- and combined into one **OmniScore**; the pair is the best against
the worst sample by OmniScore, and each pair's Diffusion-DPO loss is re-weighted by how far apart
the two are::

    z_d(x_i) = (s_d(x_i) - mean_j s_d(x_j)) / std_j s_d(x_j)      (j over the prompt's N samples)
    OmniScore(x_i) = mean_d z_d(x_i)
    w = gap^alpha / mean_pairs(gap^alpha),   gap = OmniScore(x^w) - OmniScore(x^l)
    L = mean_pairs w (-log sigmoid(M)),      M: Diffusion-DPO's margin

Where the abstract leaves a rule open, diffalign's reading (``video_preference.omni_score`` /
``omni_pairs``): each dimension is standardised within the prompt's samples so that scores on
different scales weigh alike, the dimensions are averaged, and the weight is a power of the
OmniScore gap normalised to mean 1 over the epoch's pairs (``alpha = 0``: plain Diffusion-DPO on
OmniScore pairs). ``min_margin`` is the smallest OmniScore gap (standardised units) that makes a pair.

The dimensions are the training reward (``reward`` / ``reward_kwargs`` of the run, e.g. a quality
reward scored on every frame) and each of ``metrics`` (reward names, or ``{name: ..., **kwargs}``
for rewards that need a path, e.g. an alignment reward such as ``clipscore``), the several-metric
pattern of BalancedDPO. Nothing here looks at frames: VideoDPO trains image models as well
(an image's OmniScore is the same rule); a video's image rewards are scored per frame and averaged.
Pairs come from the frozen base (``source: reference``) or the current model (``source: policy``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..config import check_range
from .balanced_dpo import pair_rows, panel_scores
from .preference import DiffusionDPO, DPOConfig, PairBatch, PairMicroBatch
from .video_preference import omni_pairs, weighted_dpo_loss


def check_reward_specs(name: str, specs: list) -> None:
    """Each entry a reward name or a dict with a ``name`` and the reward's keyword arguments."""
    for i, m in enumerate(specs):
        if not (isinstance(m, str) or (isinstance(m, dict) and isinstance(m.get("name"), str))):
            raise ValueError(f"{name}[{i}] must be a reward name or a dict with a 'name' and the reward's keyword "
                             f"arguments, got {m!r}")


@dataclass
class VideoDPOConfig(DPOConfig):
    metrics: list = field(default_factory=list)  # OmniScore dimensions beside the training reward (names or dicts)
    alpha: float = 1.0  # alpha: pair weight gap^alpha, normalised to mean 1 (0 = unweighted)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == "file":
            raise ValueError("source must be 'reference' or 'policy' for video_dpo (its pairs are picked by OmniScore "
                             "among N samples of a model), got 'file'")
        if not self.metrics:
            raise ValueError("metrics must name at least one reward beside the training reward (VideoDPO's OmniScore "
                             "combines quality and text alignment), e.g. [clipscore] or [{name: clipscore, path: DIR}]")
        check_reward_specs("metrics", self.metrics)
        check_range("alpha", self.alpha, 0, None)


class VideoDPO(DiffusionDPO):
    name = "video_dpo"

    def __init__(self, cfg: VideoDPOConfig, *, reward: Callable, reference=None):
        super().__init__(cfg, reward=reward, reference=reference)
        from .. import rewards

        self.panel = [rewards.get(m) if isinstance(m, str) else rewards.get(**m) for m in cfg.metrics]

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> PairBatch:
        cfg = self.cfg
        batch = super().collect(model, prompts, epoch=epoch, seed=seed)  # samples scored by the training reward
        extra, failed = panel_scores(self.panel, batch.images, batch.prompts)
        scores = torch.cat([batch.rewards[:, None], extra], dim=1)  # [N, 1 + len(metrics)]
        group = torch.arange(len(prompts)).repeat_interleave(cfg.group_size)
        valid = torch.nonzero(torch.isfinite(scores).all(1)).flatten()  # a failed dimension drops the sample
        chosen, rejected, weights = omni_pairs(scores[valid], group[valid], cfg.alpha, cfg.min_margin)
        batch.chosen, batch.rejected = valid[chosen], valid[rejected]
        batch.weights = weights  # type: ignore[attr-defined]
        batch.omni_scores = scores  # type: ignore[attr-defined]
        names = ["reward"] + [m if isinstance(m, str) else m["name"] for m in cfg.metrics]
        for name, col in zip(names, scores.T):
            batch.info[f"omni/{name}"] = col[torch.isfinite(col)].mean().item()
        batch.info.update({"pairs": float(len(chosen)), "metric_failed": float(failed)})
        return batch

    def loss(self, model, micro: PairMicroBatch) -> tuple[Tensor, dict[str, float]]:
        err_w, err_l = self.errors(model, micro).chunk(2)
        ref_w, ref_l = self.errors(model, micro, reference=True).chunk(2)
        w = micro.batch.weights[pair_rows(micro.batch, micro.idx[:len(err_w)])]
        loss, stats = weighted_dpo_loss(err_w, err_l, ref_w, ref_l, w, self.cfg.beta)
        return loss, {"loss": loss.item(), **stats, "pair_weight": w.mean().item()}


PRESETS: dict[str, tuple[type, type, dict]] = {"video_dpo": (VideoDPOConfig, VideoDPO, {})}
