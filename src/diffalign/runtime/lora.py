"""LoRA through peft, and the reference model of KL-regularised methods.

With LoRA the reference is the same network with the adapter disabled (no second copy in
memory); with full fine-tuning it is a frozen copy of the initial weights.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn


def lora_targets(model: nn.Module) -> list[str]:
    """The model's LoRA target modules (module-name suffixes, peft's convention)."""
    targets = getattr(model, "lora_target_modules", None)
    if not targets:
        raise ValueError(f"{type(model).__name__} declares no lora_target_modules; use lora_rank=0 (full fine-tuning)")
    return list(targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a core dependency
        raise ImportError("LoRA needs peft: pip install peft") from e
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, lora_dropout=0.0, init_lora_weights=True)
    return get_peft_model(model, cfg)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class Reference:
    """Runs a function on the reference model: ``reference(lambda m: m(x, t, cond))``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.frozen = None
        if not is_lora(model):
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, fn: Callable[[nn.Module], Any]) -> Any:
        if self.frozen is not None:
            return fn(self.frozen)
        with self.model.disable_adapter():
            return fn(self.model)
