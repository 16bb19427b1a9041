"""Alignment methods, one file per family; ``get(method)`` resolves a method name."""

from __future__ import annotations

from typing import Any

from . import crd, ddpo, forward_process, grpo, npo, preference, reward_gradient, stepwise_preference, vgg_flow
from . import (adaptive_dpo, balanced_dpo, dcpo, dense_reward_dpo, inversion_preference, lpo, ppd, ranking, sdpo,
               self_npo)

# method name -> (config class, algorithm class, preset overrides of the config defaults)
METHODS: dict[str, tuple[type, type, dict[str, Any]]] = {
    **{name: (grpo.GRPOConfig, grpo.GRPO, preset) for name, preset in grpo.PRESETS.items()},
    **{name: (ddpo.DDPOConfig, ddpo.DDPO, preset) for name, preset in ddpo.PRESETS.items()},
    **forward_process.PRESETS,
    **crd.PRESETS,
    **preference.PRESETS,
    **stepwise_preference.PRESETS,
    **npo.PRESETS,
    **{k: v for m in (sdpo, inversion_preference, dense_reward_dpo, ranking, dcpo, balanced_dpo, adaptive_dpo, ppd,
                      self_npo, lpo) for k, v in m.PRESETS.items()},
    **{name: (reward_gradient.RewardGradientConfig, reward_gradient.RewardGradient, preset)
       for name, preset in reward_gradient.PRESETS.items()},
    **{name: (vgg_flow.VGGFlowConfig, vgg_flow.VGGFlow, preset) for name, preset in vgg_flow.PRESETS.items()},
}


def names() -> list[str]:
    return sorted(METHODS)


def get(method: str) -> tuple[type, type, dict[str, Any]]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {names()}")
    return METHODS[method]


def build_config(method: str, overrides: dict[str, Any] | None = None):
    """The method's config: its dataclass defaults, then its preset, then the user's values."""
    from ..config import from_dict, merge

    cfg_cls, _, preset = get(method)
    return from_dict(cfg_cls, merge(preset, overrides or {}), path="algorithm")
