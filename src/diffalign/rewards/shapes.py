"""Rewards from the shapes world's exact verifier (:func:`diffalign.worlds.shapes.verify`).

``shapes`` is the verifier's dense score in [0, 1] (1 iff the image is exactly correct), the
GenEval-style reward of this project; ``shapes_correct`` is the binary exact-match indicator,
useful for evaluation and for sparse-reward experiments. Neither is differentiable; the smooth
surrogate lives in :mod:`diffalign.rewards.shapes_soft`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..worlds import shapes as world
from .base import Reward, check_inputs

CRITERIA = ("count", "color", "shape", "relation")


class ShapesReward(Reward):
    """The shapes verifier's dense score: mean of the count/colour/shape[/relation] criteria.

    ``details(images, prompts)`` returns every per-criterion score as numpy arrays; passing a
    ``meta`` list to ``__call__`` fills ``meta[i]["shapes"]`` with the same numbers for image ``i``
    plus the detected objects. ``relation`` is NaN for count prompts.
    """

    name = "shapes"
    differentiable = False

    def details(self, images: Tensor, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """``{"score", "correct", "count", "color", "shape", "relation"}`` -> arrays of shape ``[B]``."""
        prompts = check_inputs(images, prompts, name=self.name)
        return self._details(images, prompts)[0]

    def _details(self, images: Tensor, prompts: list[str]) -> tuple[dict[str, np.ndarray], list[list[dict]]]:
        res = world.verify(images.detach(), prompts)
        out = {"score": np.asarray(res.score, np.float64), "correct": np.asarray(res.correct, bool)}
        out.update({k: np.asarray(res.criteria[k], np.float64) for k in CRITERIA})
        return out, res.objects

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        det, objects = self._details(images, prompts)
        if meta is not None:
            for i, m in enumerate(meta):
                m["shapes"] = {"score": float(det["score"][i]), "correct": bool(det["correct"][i]),
                               **{k: float(det[k][i]) for k in CRITERIA}, "objects": objects[i]}
        return torch.from_numpy(self._value(det))

    def _value(self, det: dict[str, np.ndarray]) -> np.ndarray:
        return det["score"].astype(np.float32)


class ShapesCorrectReward(ShapesReward):
    """1.0 if the verifier finds the image exactly correct, else 0.0 (exact-match accuracy)."""

    name = "shapes_correct"

    def _value(self, det: dict[str, np.ndarray]) -> np.ndarray:
        return det["correct"].astype(np.float32)
