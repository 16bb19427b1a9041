"""Alignment methods, one file per family; ``get(method)`` resolves a method name."""

from __future__ import annotations

from typing import Any

from . import (b2_diffurl, crd, ddpo, dense_grpo, forward_process, g2rpo, grpo, npo, prdp, preference, reward_gradient,
               stepwise_preference, tp_grpo, vard, vgg_flow)
from . import (adaptive_dpo, balanced_dpo, dcpo, dense_reward_dpo, inversion_preference, lpo, ppd, ranking, sdpo,
               self_npo)
from . import dense_dpo, video_dpo

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
    **dense_dpo.PRESETS, **video_dpo.PRESETS,  # video preference (DenseDPO, VideoDPO)
    **{name: (reward_gradient.RewardGradientConfig, reward_gradient.RewardGradient, preset)
       for name, preset in reward_gradient.PRESETS.items()},
    **{name: (vgg_flow.VGGFlowConfig, vgg_flow.VGGFlow, preset) for name, preset in vgg_flow.PRESETS.items()},
    # step-level credit (docs/algorithms/step_credit.md)
    **{name: (dense_grpo.DenseGRPOConfig, dense_grpo.DenseGRPO, p) for name, p in dense_grpo.PRESETS.items()},
    **{name: (tp_grpo.TPGRPOConfig, tp_grpo.TPGRPO, p) for name, p in tp_grpo.PRESETS.items()},
    **{name: (g2rpo.G2RPOConfig, g2rpo.G2RPO, p) for name, p in g2rpo.PRESETS.items()},
    **{name: (b2_diffurl.B2DiffuRLConfig, b2_diffurl.B2DiffuRL, p) for name, p in b2_diffurl.PRESETS.items()},
    **{name: (prdp.PRDPConfig, prdp.PRDP, p) for name, p in prdp.PRESETS.items()},
    **{name: (vard.VARDConfig, vard.VARD, p) for name, p in vard.PRESETS.items()},
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
