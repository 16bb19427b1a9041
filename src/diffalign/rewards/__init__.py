"""Reward callables and their registry (see ``docs/rewards.md``).

A reward is ``reward(images [B,3,H,W] in [0,1], prompts: list[str], meta=None) -> Tensor[B]``
with attributes ``name`` and ``differentiable``::

    from diffalign import rewards
    r = rewards.get("shapes")                     # exact shapes-world verifier
    r = rewards.get("clipscore", path="/models/clip-vit-base-patch32")
    parts = rewards.get_many("shapes,brightness")
    combo = rewards.WeightedSum(parts, [1.0, 0.1], normalize="running")

``rewards.names()`` lists what ``get`` accepts. Heavy dependencies (transformers, fastapi,
httpx) are imported only by the rewards that need them (``pip install diffalign[rewards]``).
"""

from __future__ import annotations

from .base import IMAGE_SLACK, Reward, check_inputs
from .combine import WeightedSum
from .registry import describe, get, get_many, names, register

__all__ = ["IMAGE_SLACK", "Reward", "WeightedSum", "check_inputs", "describe", "get", "get_many", "names", "register"]
