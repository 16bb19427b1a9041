"""Sampling a model to a directory of PNGs plus a ``samples.jsonl`` index (``diffalign sample``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.sampling import generate
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


def sample_to_dir(model_name: str, prompts: list[str], out: str | Path, *, num_per_prompt: int, seed: int = 0,
                  sampler=None, num_steps=None, guidance_scale=None, eta=None, device="auto") -> str:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_name, device=resolve_device(device))
    settings = resolve_sampling(model, sampler, num_steps, guidance_scale, eta)
    all_prompts = [p for p in prompts for _ in range(num_per_prompt)]
    seeds = [seed + i for i in range(len(all_prompts))]
    images = generate(model, all_prompts, seeds, **settings)
    scores = None
    if all(is_shapes_prompt(p) for p in prompts):
        res = shapes.verify(images, all_prompts)
        scores, correct = res.score, res.correct
    pixels = to_uint8(images)
    with (out / "samples.jsonl").open("w") as f:
        for i, (p, s) in enumerate(zip(all_prompts, seeds)):
            name = f"{i:05d}.png"
            Image.fromarray(pixels[i]).save(out / name)
            rec = {"file": name, "prompt": p, "seed": s, "score": None if scores is None else float(scores[i])}
            if scores is not None:
                rec["correct"] = bool(correct[i])
            f.write(json.dumps(rec) + "\n")
    line = f"wrote {len(all_prompts)} images to {out} ({settings['sampler']}, {settings['num_steps']} steps, " \
           f"guidance {settings['guidance_scale']})"
    if scores is not None:
        line += f"; verifier score {float(np.mean(scores)):.3f}, exact accuracy {float(np.mean(correct)):.3f}"
    return line
