"""Sampling a model to a directory of PNGs (videos: MP4 / animated WebP) plus a ``samples.jsonl``
index (``diffalign sample``); a prompt's conditioning images are written beside its samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.prompts import load_image, prompt_images
from ..core.sampling import generate
from ..evaluation.video import to_uint8_frames, video_format, write_video
from ..models import load_model
from ..worlds import shapes
from .devices import resolve_device


def resolve_sampling(model, sampler=None, num_steps=None, guidance_scale=None, eta=None) -> dict:
    """The model's default sampler settings, overridden by whatever was given."""
    d = dict(getattr(model, "sampling_defaults", {"sampler": "flow_ode", "num_steps": 10, "guidance_scale": 1.0,
                                                  "eta": None}))
    for k, v in (("sampler", sampler), ("num_steps", num_steps), ("guidance_scale", guidance_scale), ("eta", eta)):
        if v is not None:
            d[k] = v
    return d


is_shapes_prompt = shapes.is_prompt


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B,3,H,W]`` in ``[0,1]`` -> ``uint8 [B,H,W,3]``."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_sources(prompt: str, index: int, out: Path, size: tuple[int, int]) -> list[str]:
    """Save a prompt's conditioning images beside its samples (as the model saw them: at ``size``)."""
    names = []
    for k, path in enumerate(prompt_images(prompt)):
        name = f"source_{index:04d}_{k}.png"
        Image.fromarray(to_uint8(load_image(path, size)[None])[0]).save(out / name)
        names.append(name)
    return names


def sample_to_dir(model_name: str, prompts: list[str], out: str | Path, *, num_per_prompt: int, seed: int = 0,
                  sampler=None, num_steps=None, guidance_scale=None, eta=None, device="auto",
                  video: str = "auto") -> str:
    """Sample ``num_per_prompt`` images (or videos) per prompt into ``out``; ``video``: the video file
    format, ``auto`` (MP4 with PyAV installed, else WebP), ``mp4`` or ``webp``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_name, device=resolve_device(device))
    settings = resolve_sampling(model, sampler, num_steps, guidance_scale, eta)
    all_prompts = [p for p in prompts for _ in range(num_per_prompt)]
    seeds = [seed + i for i in range(len(all_prompts))]
    fmt = video_format(video) if getattr(model, "is_video", False) else None  # fail before sampling
    images = generate(model, all_prompts, seeds, **settings)
    scores = None
    if images.ndim == 4 and all(is_shapes_prompt(p) for p in prompts):
        res = shapes.verify(images, all_prompts)
        scores, correct = res.score, res.correct
    sources = [write_sources(p, j, out, tuple(images.shape[-2:])) for j, p in enumerate(prompts)]
    with (out / "samples.jsonl").open("w") as f:
        for i, (p, s) in enumerate(zip(all_prompts, seeds)):
            if images.ndim == 5:  # a video [F, 3, H, W]
                name = f"{i:05d}.{fmt}"
                write_video(to_uint8_frames(images[i]), out / name, model.fps)
                extra = {"frames": int(images.shape[1]), "fps": model.fps}
            else:
                name = f"{i:05d}.png"
                Image.fromarray(to_uint8(images[i:i + 1])[0]).save(out / name)
                extra = {}
            rec = {"file": name, "prompt": p, "seed": s, "score": None if scores is None else float(scores[i]), **extra}
            if prompt_images(p):
                rec.update(images=list(prompt_images(p)), sources=sources[i // num_per_prompt])
            if getattr(p, "negative", ""):
                rec["negative_prompt"] = p.negative
            if scores is not None:
                rec["correct"] = bool(correct[i])
            f.write(json.dumps(rec) + "\n")
    what = "videos" if images.ndim == 5 else "images"
    line = f"wrote {len(all_prompts)} {what} to {out} ({settings['sampler']}, {settings['num_steps']} steps, " \
           f"guidance {settings['guidance_scale']})"
    if scores is not None:
        line += f"; verifier score {float(np.mean(scores)):.3f}, exact accuracy {float(np.mean(correct)):.3f}"
    return line
