"""Weighted combinations of rewards (multi-reward alignment).

``WeightedSum(parts, weights, normalize=...)`` scores ``sum_i w_i * n_i(r_i)`` where ``n_i`` is a
per-reward normalisation:

* ``"none"``: ``n(r) = r``;
* ``"fixed"``: ``n(r) = (r - offset) / scale`` with user-given ``scales`` (and ``offsets``,
  default 0), e.g. to put CLIPScore (~0..40) and the shapes score (0..1) on one scale;
* ``"running"``: ``n(r) = (r - mean) / (std + eps)`` with the mean and standard deviation of
  every score this reward has seen so far (Welford's algorithm, including the current batch,
  which is added *before* normalising it). The statistics are treated as constants for
  autograd. ``state_dict()`` / ``load_state_dict()`` let a training run checkpoint them.

``differentiable`` is True iff every part is. The raw part scores of the last call are kept in
``last_parts`` (``{name: Tensor[B]}``) and, when ``meta`` is given, in ``meta[i]["rewards"]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..config import check_choice, check_range
from .base import Reward

NORMALIZE = ("none", "fixed", "running")


class WeightedSum(Reward):
    """``sum_i weights[i] * normalize_i(rewards[i](images, prompts))``; see the module docstring.
    Videos go to every part whole (each image reward reduces over frames by its own ``frames``)."""

    video = None

    def __init__(self, rewards: Sequence[Reward] | str, weights: Sequence[float] | None = None,
                 normalize: str = "none", scales: Sequence[float] | None = None,
                 offsets: Sequence[float] | None = None, eps: float = 1e-6):
        if isinstance(rewards, str) or (rewards and all(isinstance(r, str) for r in rewards)):
            from .registry import get_many

            rewards = get_many(rewards)  # type: ignore[arg-type]
        self.rewards = list(rewards)
        if not self.rewards or not all(callable(r) and hasattr(r, "name") for r in self.rewards):
            raise ValueError("WeightedSum needs a non-empty list of rewards (callables with a .name)")
        n = len(self.rewards)
        self.weights = [1.0] * n if weights is None else [float(w) for w in weights]
        if len(self.weights) != n:
            raise ValueError(f"WeightedSum got {n} rewards but {len(self.weights)} weights")
        for i, w in enumerate(self.weights):
            check_range(f"weights[{i}]", w)
        self.normalize = check_choice("normalize", normalize, NORMALIZE)
        self.eps = check_range("eps", eps, 0, None, lo_open=True)
        if normalize == "fixed":
            if scales is None or len(scales) != n:
                raise ValueError(f"normalize='fixed' needs scales: one positive number per reward ({n}), got {scales!r}")
            self.scales = [float(check_range(f"scales[{i}]", s, 0, None, lo_open=True)) for i, s in enumerate(scales)]
            self.offsets = [0.0] * n if offsets is None else [float(o) for o in offsets]
            if len(self.offsets) != n:
                raise ValueError(f"WeightedSum got {n} rewards but {len(self.offsets)} offsets")
        elif scales is not None or offsets is not None:
            raise ValueError(f"scales/offsets are only used with normalize='fixed', not {normalize!r}")
        names, seen = [], {}
        for r in self.rewards:  # unique keys for logging even if a reward appears twice
            seen[r.name] = seen.get(r.name, 0) + 1
            names.append(r.name if seen[r.name] == 1 else f"{r.name}#{seen[r.name]}")
        self.part_names = names
        self.name = "+".join(f"{w:g}*{k}" for w, k in zip(self.weights, names))
        self.differentiable = all(getattr(r, "differentiable", False) for r in self.rewards)
        self.count = [0] * n
        self.mean = [0.0] * n
        self.m2 = [0.0] * n
        self.last_parts: dict[str, Tensor] = {}

    def _update(self, i: int, r: Tensor) -> None:
        """Welford/Chan merge of a batch into the running mean and sum of squared deviations."""
        x = r.detach().double().cpu()
        nb, mb = x.numel(), float(x.mean())
        m2b = float(((x - mb) ** 2).sum())
        na = self.count[i]
        tot = na + nb
        delta = mb - self.mean[i]
        self.mean[i] += delta * nb / tot
        self.m2[i] += m2b + delta**2 * na * nb / tot
        self.count[i] = tot

    def std(self, i: int) -> float:
        """Running (population) standard deviation of reward ``i``."""
        return (self.m2[i] / self.count[i]) ** 0.5 if self.count[i] else 1.0

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        self.last_parts = {}
        for i, (r, w, key) in enumerate(zip(self.rewards, self.weights, self.part_names)):
            raw = r(images, prompts, meta).to(device=images.device, dtype=torch.float32)
            self.last_parts[key] = raw.detach()
            if self.normalize == "fixed":
                val = (raw - self.offsets[i]) / self.scales[i]
            elif self.normalize == "running":
                self._update(i, raw)
                val = (raw - self.mean[i]) / (self.std(i) + self.eps)
            else:
                val = raw
            total = total + w * val
        if meta is not None:
            for j, m in enumerate(meta):
                m.setdefault("rewards", {}).update({k: float(v[j]) for k, v in self.last_parts.items()})
        return total

    def state_dict(self) -> dict:
        """Running statistics (for checkpoints)."""
        return {"names": list(self.part_names), "count": list(self.count), "mean": list(self.mean), "m2": list(self.m2)}

    def load_state_dict(self, state: dict) -> None:
        """Restore running statistics saved by :meth:`state_dict` (the reward names must match)."""
        if list(state.get("names", [])) != self.part_names:
            raise ValueError(f"running statistics are for rewards {state.get('names')}, not {self.part_names}")
        self.count, self.mean, self.m2 = list(state["count"]), list(state["mean"]), list(state["m2"])

    def to(self, device: str | torch.device) -> "WeightedSum":
        for r in self.rewards:
            if hasattr(r, "to"):
                r.to(device)
        return self
