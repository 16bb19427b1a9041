"""LoRA through peft, the reference model of KL-regularised methods, and LoRA merged for rollouts.

With LoRA the reference is the same network with the adapter disabled (no second copy in
memory); with full fine-tuning it is a frozen copy of the initial weights.

Rollouts need no gradient, so they can run with the adapter merged into the base weights
(``W + s B A``: one matmul per layer instead of three) and training goes on with it unmerged.
``merged_lora`` restores the base weights from a copy, so they come back bit-identical (peft's
own unmerge subtracts ``s B A`` again, which rounds).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator

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


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers in ``model`` (none without peft or without LoRA)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a core dependency
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with its active LoRA adapters merged into the base weights (no gradient flows
    to the adapter meanwhile: use it for sampling). On exit the base weights are restored from a
    copy, bit for bit, and the layers compute ``W x + s B A x`` again. A no-op without LoRA.

    Inside, the reference model (``disable_adapter``) still works: peft unmerges a merged layer
    before running it without the adapter, and the exit restores the exact weights anyway."""
    # nn.MultiheadAttention reads its out_proj's weight directly, so a LoRA there never runs (nor trains):
    # merging it would change the model
    bypassed = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    layers = [m for m in lora_layers(model) if not m.merged and not m.disable_adapters and id(m) not in bypassed]
    saved = []
    try:
        with torch.no_grad():
            for m in layers:
                base = m.get_base_layer()
                bias = getattr(base, "bias", None)
                saved.append((m, base.weight.detach().clone(), None if bias is None else bias.detach().clone()))
                m.merge()
        yield model
    finally:
        with torch.no_grad():
            for m, weight, bias in saved:
                base = m.get_base_layer()
                base.weight.data.copy_(weight)
                if bias is not None:
                    base.bias.data.copy_(bias)
                m.merged_adapters.clear()  # the copy undid every merged adapter
