"""Group-wise rewards: a reward that scores the whole group of images of one prompt at once, so an
image's score depends on its siblings -- its rank in the group, or its win rate against them
(Pref-GRPO, Wang et al. 2025, "Pref-GRPO: Pairwise Preference Reward-based GRPO"; Flow-Factory's
``PickScore_Rank``). Online methods pass the rollout's group ids (``algorithms/_rollout.py``);
called without them, images with the same prompt form a group.

* ``group_rank``: the rank of the base reward's score within the group, scaled to [0, 1]
  (ties share their mean rank; a group of one scores 0.5).
* ``group_winrate``: the mean over the other images ``j`` of the group of ``P(i beats j)``.
  ``preference="bradley_terry"``: ``sigmoid((r_i - r_j) / temperature)`` -- a pairwise preference
  model's own probability when the base is a Bradley-Terry reward (``learned``; PickScore's
  logits are trained the same way); ``"hard"``: 1 / 0.5 / 0 for a win / tie / loss, which equals
  ``group_rank``. Or ``pairwise=``: any callable ``(images_a, images_b, prompts) -> P(a beats b)``.

Both are permutation-equivariant: permuting a group permutes its scores.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..config import check_choice, check_range
from .base import Reward, check_inputs


def group_ids(prompts: Sequence[str], group: Any) -> Tensor:
    """``group`` as a ``[B]`` long tensor, or ids by identical prompt when ``None``; every group
    must hold one prompt."""
    if group is None:
        first: dict[str, int] = {}
        return torch.tensor([first.setdefault(p, len(first)) for p in prompts], dtype=torch.long)
    ids = torch.as_tensor(group).reshape(-1).long().cpu()
    if ids.numel() != len(prompts):
        raise ValueError(f"group must give one id per image: got {ids.numel()} ids for {len(prompts)} images")
    for g in ids.unique():
        members = {prompts[i] for i in torch.nonzero(ids == g).flatten().tolist()}
        if len(members) > 1:
            raise ValueError(f"group {int(g)} mixes prompts {sorted(members)[:3]}; a group holds images of one prompt")
    return ids


def rank_in_group(scores: Tensor) -> Tensor:
    """Scores -> mean 0-based rank / (G - 1) in [0, 1] (ties share their mean rank; G = 1 -> 0.5)."""
    g = scores.numel()
    if g == 1:
        return torch.full_like(scores, 0.5)
    less = (scores[:, None] > scores[None, :]).sum(1).float()
    ties = (scores[:, None] == scores[None, :]).sum(1).float() - 1
    return (less + ties / 2) / (g - 1)


class GroupReward(Reward):
    """Base of group-wise rewards: ``reward(images, prompts, meta=None, group=None)``; subclasses
    implement ``score_group(images, prompt, base_scores) -> Tensor[G]``."""

    groupwise = True
    differentiable = False

    def __init__(self, base: str | Reward | None = None, base_kwargs: dict | None = None):
        from .registry import get

        if base is None:
            self.base = None
        elif isinstance(base, str):
            self.base = get(base, **dict(base_kwargs or {}))
        elif callable(base):
            self.base = base
        else:
            raise ValueError(f"{self.name}: base must be a reward name or a reward, got {type(base).__name__}")

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: list[dict] | None = None,
                 group: Any = None) -> Tensor:
        prompts = check_inputs(images, prompts, meta, name=self.name)
        ids = group_ids(prompts, group)
        base = None
        if self.base is not None:  # one batched call of the base reward for every group
            base = torch.as_tensor(self.base(images, prompts, meta)).detach().float().cpu().reshape(-1)
        out = torch.empty(len(prompts), dtype=torch.float32)
        for g in ids.unique():
            idx = torch.nonzero(ids == g).flatten()
            out[idx] = self.score_group(images[idx.to(images.device)], prompts[int(idx[0])],
                                        None if base is None else base[idx]).float().cpu()
        if meta is not None:
            for m, v in zip(meta, out.tolist()):
                m[self.name] = v
        return out.to(images.device)

    def score_group(self, images: Tensor, prompt: str, base: Tensor | None) -> Tensor:
        raise NotImplementedError


class GroupRank(GroupReward):
    """The rank of ``base``'s score within the group, in [0, 1] (Flow-Factory's ``PickScore_Rank``
    with ``base="pickscore"``)."""

    name = "group_rank"

    def __init__(self, base: str | Reward = "shapes", base_kwargs: dict | None = None):
        super().__init__(base, base_kwargs)

    def score_group(self, images: Tensor, prompt: str, base: Tensor | None) -> Tensor:
        return rank_in_group(base)


class GroupWinRate(GroupReward):
    """Mean probability of beating each other image of the group (module docstring)."""

    name = "group_winrate"

    def __init__(self, base: str | Reward | None = "learned", base_kwargs: dict | None = None,
                 preference: str = "bradley_terry", temperature: float = 1.0,
                 pairwise: Callable[[Tensor, Tensor, list[str]], Tensor] | None = None):
        if pairwise is not None and base not in (None, "learned"):
            raise ValueError("group_winrate: give either base= (a pointwise reward) or pairwise=, not both")
        if pairwise is not None and not callable(pairwise):
            raise ValueError(f"group_winrate: pairwise must be a callable (images_a, images_b, prompts) -> P(a beats b)")
        super().__init__(None if pairwise is not None else base, base_kwargs)
        self.pairwise = pairwise
        self.preference = check_choice("preference", preference, ("bradley_terry", "hard"))
        self.temperature = check_range("temperature", temperature, 0, None, lo_open=True)

    def score_group(self, images: Tensor, prompt: str, base: Tensor | None) -> Tensor:
        g = images.shape[0]
        if g == 1:
            return torch.full((1,), 0.5)
        if self.pairwise is not None:
            i, j = torch.triu_indices(g, g, 1)
            p = torch.as_tensor(self.pairwise(images[i], images[j], [prompt] * len(i))).float().cpu().reshape(-1)
            win = torch.full((g, g), 0.0)
            win[i, j], win[j, i] = p, 1 - p  # P(j beats i) = 1 - P(i beats j)
        elif self.preference == "hard":
            win = (base[:, None] > base[None, :]).float() + 0.5 * (base[:, None] == base[None, :]).float()
        else:
            win = torch.sigmoid((base[:, None] - base[None, :]) / self.temperature)
        win.fill_diagonal_(0.0)
        return win.sum(1) / (g - 1)
