"""Atomic checkpoints: written to a temporary file in the same directory, then renamed, so a
crash mid-write never leaves a corrupt or half-written checkpoint behind."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..config import atomic_write, diff_configs, to_dict


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path, cfg, *, step: int, model=None, optimizer=None, ema=None, **extra) -> None:
    state = {"config": to_dict(cfg), "step": step, **extra}
    if model is not None:
        state["model"] = model.state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if ema is not None:
        state["ema"] = ema.state_dict()
    atomic_torch_save(state, path)


def check_resumable(saved: dict, cfg, *, force: bool = False, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to resume with a changed config, naming the differing fields, unless ``force``."""
    diff = [k for k in diff_configs(saved, to_dict(cfg)) if k not in ignore]
    if diff and not force:
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {diff}; "
                         "use the original config or pass --force to resume anyway")


def load_checkpoint(path, cfg, *, model=None, optimizer=None, ema=None, force: bool = False,
                    ignore: tuple[str, ...] = ()) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    check_resumable(state["config"], cfg, force=force, ignore=ignore)
    if model is not None:
        model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return state
