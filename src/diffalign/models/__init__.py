"""Denoiser implementations and the one place that resolves a model name or directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
SHORT_NAMES = ("shapes-flow", "shapes-vp")


def resolve_model_path(name_or_dir: str | Path) -> Path:
    """A short name (``shapes-flow``, ``shapes-vp``) or a directory -> the model directory."""
    s = str(name_or_dir)
    if s in SHORT_NAMES:
        path = WEIGHTS_DIR / s
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the shipped weights of {s!r} are missing from {path}; reinstall diffalign "
                                    f"or rebuild them with `diffalign pretrain --world shapes --model "
                                    f"{s.split('-')[1]} --out {path}`")
        return path
    path = Path(s)
    if path.is_dir():
        return path
    raise ValueError(f"unknown model {s!r}: not a short name {list(SHORT_NAMES)} and not a directory")


def load_model(name_or_dir: str | Path, device: str | torch.device = "cpu"):
    """Load any model diffalign can sample from or train, by short name or directory."""
    path = resolve_model_path(name_or_dir)
    if (path / "model_index.json").is_file():
        from .diffusers_adapter import DiffusersDenoiser  # diffusers itself is imported inside (optional extra)

        return DiffusersDenoiser.from_pretrained(path, device=device)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a model directory: expected config.json and model.safetensors "
                                f"(a diffalign model) or model_index.json (a diffusers pipeline)")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type == "shapes-unet":
        from .shapes_unet import ShapesDenoiser

        return ShapesDenoiser.from_pretrained(path, device=device)
    raise ValueError(f"{cfg_file}: unknown model_type {model_type!r}; expected 'shapes-unet'")
