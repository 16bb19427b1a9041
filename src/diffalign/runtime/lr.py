"""Learning-rate schedules of the runtime: a linear warm-up, then constant, cosine or linear decay to a
fraction of the peak. Pure functions of the step (or epoch) index, so a resumed run continues the schedule
exactly; fine-tuning (`trainer.lr_at`, per epoch) and pretraining (`pretrain.lr_at`, per step) share them."""

from __future__ import annotations

import math
from typing import Any

from ..config import check_choice, check_range

LR_SCHEDULES = ("constant", "cosine", "linear")


def scheduled_lr(lr: float, i: int, span: int, warmup: int = 0, schedule: str = "cosine", final: float = 0.1) -> float:
    """The rate at index ``i`` (0-based): ``lr * (i + 1) / warmup`` during the warm-up, then ``schedule`` from
    ``lr`` down to ``final * lr``, reached ``span`` indices after the warm-up and held from there."""
    if i < warmup:
        return lr * (i + 1) / warmup
    if schedule == "constant":
        return lr
    p = min(1.0, (i - warmup) / max(1, span))
    shape = 0.5 * (1 + math.cos(math.pi * p)) if schedule == "cosine" else 1 - p
    return lr * (final + (1 - final) * shape)


def check_lr_schedule(cfg: Any) -> None:
    """Validate a fine-tuning config's ``lr_schedule``, ``lr_warmup_epochs`` and ``lr_final``."""
    check_choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    check_range("lr_warmup_epochs", cfg.lr_warmup_epochs, 0, cfg.epochs - 1, integer=True)
    check_range("lr_final", cfg.lr_final, 0, 1)


def lr_at(cfg: Any, epoch: int) -> float:
    """The rate of fine-tuning epoch ``epoch`` (0-based, `TrainConfig`): ``lr_schedule`` reaches ``lr_final * lr``
    at the last epoch (``max_minutes`` ending a run early leaves the rest unused; the final model is the last
    epoch's)."""
    w = cfg.lr_warmup_epochs
    return scheduled_lr(cfg.lr, epoch, cfg.epochs - 1 - w, w, cfg.lr_schedule, cfg.lr_final)
