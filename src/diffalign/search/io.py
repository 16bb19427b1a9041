"""Writing a :class:`~diffalign.search.base.SearchResult` to a directory, as ``diffalign sample`` does:
one PNG per image (a video model's samples: MP4 / animated WebP), ``samples.jsonl`` (``file, prompt, seed, score`` -- the search reward -- plus the
shapes verifier's ``verifier_score`` and ``correct`` when every prompt is a shapes-world prompt)
and ``summary.json`` (method, NFE spent, budget, mean scores, scalar trace entries)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..worlds import shapes
from .base import SearchResult


is_shapes_prompt = shapes.is_prompt


def verifier_scores(result: SearchResult) -> tuple[np.ndarray, np.ndarray] | None:
    """``(score, correct)`` of the shapes verifier, or ``None`` unless every prompt is a shapes prompt."""
    if not result.prompts or result.images.ndim != 4 or not all(is_shapes_prompt(p) for p in result.prompts):
        return None
    res = shapes.verify(result.images, result.prompts)
    return np.asarray(res.score, np.float64), np.asarray(res.correct, bool)


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else None
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, np.generic):
        return v.item()
    return None


def save_result(result: SearchResult, out: str | Path, fps: float = 8.0) -> dict:
    """Write the images (videos at ``fps``), ``samples.jsonl`` and ``summary.json`` to ``out``;
    returns the summary."""
    from ..evaluation.video import to_uint8_frames, video_format, write_video

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    video = result.images.ndim == 5
    if not video:
        pixels = (result.images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    ver = verifier_scores(result)
    with (out / "samples.jsonl").open("w") as f:
        for i, (p, s) in enumerate(zip(result.prompts, result.seeds)):
            if video:
                name = f"{i:05d}.{video_format('auto')}"
                write_video(to_uint8_frames(result.images[i]), out / name, fps)
            else:
                name = f"{i:05d}.png"
                Image.fromarray(pixels[i]).save(out / name)
            rec = {"file": name, "prompt": p, "seed": int(s), "score": float(result.scores[i])}
            if getattr(p, "images", ()):
                rec["images"] = list(p.images)
            if ver is not None:
                rec["verifier_score"] = float(ver[0][i])
                rec["correct"] = bool(ver[1][i])
            f.write(json.dumps(rec) + "\n")
    summary = {"method": result.trace.get("method"), "images": len(result.prompts), "nfe": int(result.nfe),
               "budget": result.trace.get("budget"), "mean_score": float(result.scores.mean()),
               "trace": {k: _plain(v) for k, v in result.trace.items() if _plain(v) is not None}}
    if ver is not None:
        summary["verifier_score"] = float(ver[0].mean())
        summary["exact_accuracy"] = float(ver[1].mean())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
