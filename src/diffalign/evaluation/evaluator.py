"""Compare models on the same prompts and seeds: rewards, held-out rewards, verifier accuracy,
diversity, drift from a base model, win rates and seed stability (see docs/evaluation.md)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.sampling import generate
from ..config import atomic_write
from ..worlds import shapes
from .features import ENCODER_INPUT, ENCODER_NAME, fid_kid, pooled_pixels, rms_distance, within_prompt_diversity
from .grid import save_frame_strips, save_grid, save_video_grid
from .video import video_format

RESULT_VERSION = 1
LABEL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
DEFAULT_SAMPLING = {"sampler": "flow_ode", "num_steps": 10, "guidance_scale": 1.0, "eta": None}
DEFINITIONS = {
    "mean/std": "mean and sample standard deviation (ddof=1) of the reward over all P x K images",
    "stderr": "standard error of the mean with prompts as the unit: std of the P per-prompt means / sqrt(P)",
    "seed_block_std": "std over the K seed blocks (block k = the k-th sample of every prompt) of the block's "
                      "mean reward; 'stability' is this number for the target reward",
    "diversity": "mean over prompts of the mean pairwise RMS distance between the K samples of the prompt, "
                 "on images average-pooled to 8x8 (192 values in [0, 1])",
    "drift": "mean over images of the same 8x8-pooled RMS distance between an image and the base model's image "
             "from the same seed (same initial noise)",
    "fid/kid": f"FID and KID (torchmetrics) between the model's and the base model's images, on the 64 features "
               f"of the frozen random-weight CNN {ENCODER_NAME!r}",
    "win_rate": "fraction of same-seed image pairs where the model's reward beats the base model's; ties count 1/2",
    "accuracy": "shapes verifier exact accuracy per category (shapes world only)",
}


def check_label(label: str) -> str:
    """Model labels name output files (``images_<label>.png``), so they are restricted."""
    if not isinstance(label, str) or not re.fullmatch(LABEL_PATTERN, label):
        raise ValueError(f"model label {label!r} is not allowed: use letters, digits, '_', '.', '-' "
                         f"(pattern {LABEL_PATTERN})")
    return label


def eval_seeds(num_prompts: int, seeds_per_prompt: int, seed: int = 0) -> list[int]:
    """Seeds of all images, prompt-major: sample ``k`` of prompt ``i`` uses ``seed + i * K + k``."""
    return [seed + i * seeds_per_prompt + k for i in range(num_prompts) for k in range(seeds_per_prompt)]


is_shapes_prompt = shapes.is_prompt


def _settings(model: Any, **given: Any) -> dict[str, Any]:
    out = dict(getattr(model, "sampling_defaults", DEFAULT_SAMPLING))
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def _schedule_kind(model: Any) -> str | None:
    return getattr(getattr(model, "schedule", None), "kind", None)


def _score(reward: Any, images: torch.Tensor, prompts: list[str], batch_size: int) -> np.ndarray:
    name = getattr(reward, "name", repr(reward))
    out = []
    for i in range(0, len(prompts), batch_size):
        r = reward(images[i:i + batch_size], prompts[i:i + batch_size])
        r = torch.as_tensor(r).detach().double().cpu().reshape(-1)
        if r.numel() != len(prompts[i:i + batch_size]):
            raise ValueError(f"reward {name!r} returned {r.numel()} scores for {len(prompts[i:i + batch_size])} images")
        out.append(r.numpy())
    scores = np.concatenate(out) if out else np.zeros(0)
    if not np.isfinite(scores).all():
        raise ValueError(f"reward {name!r} returned non-finite scores")
    return scores


def reward_stats(scores: np.ndarray, num_prompts: int, per_prompt: int) -> dict[str, float | None]:
    """``mean``, ``std``, ``stderr`` and ``seed_block_std`` of prompt-major scores (see ``DEFINITIONS``)."""
    s = np.asarray(scores, np.float64).reshape(num_prompts, per_prompt)
    n = s.size
    if num_prompts >= 2:
        stderr = float(s.mean(1).std(ddof=1) / math.sqrt(num_prompts))
    else:
        stderr = float(s.std(ddof=1) / math.sqrt(n)) if n >= 2 else None
    return {"mean": float(s.mean()), "std": float(s.std(ddof=1)) if n >= 2 else 0.0, "stderr": stderr,
            "seed_block_std": float(s.mean(0).std(ddof=1)) if per_prompt >= 2 else None}


def win_rate(scores: np.ndarray, base_scores: np.ndarray) -> float:
    """Fraction of pairs where ``scores`` beats ``base_scores``; ties count one half."""
    a, b = np.asarray(scores), np.asarray(base_scores)
    return float(((a > b) + 0.5 * (a == b)).mean())


def _validate(models, prompts, seeds_per_prompt, rewards, target, base) -> list[str]:
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty dict {label: model}")
    for label in models:
        check_label(label)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if isinstance(seeds_per_prompt, bool) or not isinstance(seeds_per_prompt, int) or seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be an int >= 1, got {seeds_per_prompt!r}")
    names = [getattr(r, "name", None) for r in rewards]
    if any(not isinstance(n, str) or not callable(r) for n, r in zip(names, rewards)):
        raise ValueError("every reward must be a callable with a str attribute 'name'")
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique, got {names}")
    if target is not None and target not in names:
        raise ValueError(f"target {target!r} is not one of the rewards; allowed: {names}")
    if base is not None and base not in models:
        raise ValueError(f"base {base!r} is not a model label; allowed: {list(models)}")
    return prompts


def evaluate(models: Mapping[str, Any], prompts: Sequence[str], *, seeds_per_prompt: int = 4, seed: int = 0,
             rewards: Sequence[Any] = (), target: str | None = None, sampler: str | None = None,
             num_steps: int | None = None, guidance_scale: float | None = None, eta: float | None = None,
             base: str | None = None, batch_size: int = 256, out_dir: str | Path | None = None,
             grid_prompts: int = 8, negative_models: Mapping[str, Any] | None = None,
             keep_scores: bool = False) -> dict[str, Any]:
    """Sample every model on the same ``prompts`` x ``seeds_per_prompt`` seeds and compare them.

    models: ``{label: model}``; labels name files, so they match ``LABEL_PATTERN``.
    rewards: reward objects ``reward(images, prompts) -> Tensor[B]`` with a ``name``.
    target: the reward being optimised; every other reward is reported as held-out.
    sampler / num_steps / guidance_scale / eta: sampling settings shared by all models; ``None``
        takes the value from the base model's (else the first model's) ``sampling_defaults``. With
        ``sampler=None``, a model of another schedule family (a VP model beside a flow base, say)
        samples with its own ``sampling_defaults`` (the given step count, guidance and eta still
        apply); each model's entry records the settings it was sampled with.
    base: the label of the reference model for drift, FID/KID and win rates.
    out_dir: when given, ``images_<label>.png`` grids of the first ``grid_prompts`` prompts x K
        samples are written there (verified-correct tiles framed green, wrong ones red).
    negative_models: ``{label: model}``: that label's model is sampled with this model in the
        unconditional branch of guidance (Diffusion-NPO; ``core.sampling.generate``).
    keep_scores: also return every image's score, ``models[label]["scores"][reward]`` (prompt-major
        lists of ``P * K``; benchmarks such as GenEval tabulate them).

    Returns a JSON-able dict (see docs/evaluation.md and ``DEFINITIONS``).
    """
    prompts = _validate(models, prompts, seeds_per_prompt, list(rewards), target, base)
    ref = models[base] if base is not None else next(iter(models.values()))
    settings = _settings(ref, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale, eta=eta)

    def settings_for(model: Any) -> dict[str, Any]:
        if sampler is None and _schedule_kind(model) != _schedule_kind(ref):
            return _settings(model, num_steps=num_steps, guidance_scale=guidance_scale, eta=eta)
        return settings

    P, K = len(prompts), seeds_per_prompt
    flat_prompts = [p for p in prompts for _ in range(K)]
    seeds = eval_seeds(P, K, seed)
    reward_names = [r.name for r in rewards]
    grid_n = min(grid_prompts, P) * K
    world = all(map(is_shapes_prompt, prompts))

    per: dict[str, dict[str, Any]] = {}
    for label, model in models.items():
        start = time.perf_counter()
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        try:
            sampling = settings_for(model)
            images = generate(model, flat_prompts, seeds, batch_size=batch_size,
                              negative_model=(negative_models or {}).get(label), **sampling)
        finally:
            if was_training:
                model.train()
        rec: dict[str, Any] = {"sampling": sampling,
                               "scores": {r.name: _score(r, images, flat_prompts, batch_size) for r in rewards},
                               "pooled": pooled_pixels(images), "seconds": time.perf_counter() - start}
        frames = images.flatten(0, 1) if images.ndim == 5 else images  # videos: FID / KID over all frames
        small = frames if frames.shape[-2:] == (ENCODER_INPUT,) * 2 else F.interpolate(frames, ENCODER_INPUT,
                                                                                       mode="area")
        rec["small"] = small
        rec["diversity"] = within_prompt_diversity(images, P, K)
        rec["verify"] = (shapes.verify(images, flat_prompts) if world and images.ndim == 4
                         and images.shape[-2:] == (32, 32) else None)
        rec["fps"] = getattr(model, "fps", None)
        rec["grid_images"] = images[:grid_n].clone()
        per[label] = rec
        del images
    shapes_world = all(rec["verify"] is not None for rec in per.values())

    out_dir = Path(out_dir) if out_dir is not None else None
    result_models: dict[str, Any] = {}
    for label, rec in per.items():
        stats = {name: reward_stats(rec["scores"][name], P, K) for name in reward_names}
        entry: dict[str, Any] = {
            "rewards": stats,
            "diversity": rec["diversity"],
            "stability": stats[target]["seed_block_std"] if target is not None else None,
            "shapes": None, "vs_base": None, "grid": None, "seconds": round(rec["seconds"], 3),
            "sampling": rec["sampling"],
        }
        if keep_scores:
            entry["scores"] = {name: [float(x) for x in rec["scores"][name]] for name in reward_names}
        if shapes_world:
            v = rec["verify"]
            entry["shapes"] = {"accuracy": shapes.accuracy_by_category(flat_prompts, v.correct),
                               "breakdown": shapes.breakdown(flat_prompts, v),
                               "verifier_score": float(np.mean(v.score))}
        if base is not None and label != base:
            b = per[base]
            entry["vs_base"] = {
                "drift": float(rms_distance(rec["pooled"].double(), b["pooled"].double()).mean()),
                **fid_kid(rec["small"], b["small"], seed=seed),
                "win_rate": {name: win_rate(rec["scores"][name], b["scores"][name]) for name in reward_names},
            }
        if out_dir is not None and grid_n:
            rows = min(grid_prompts, P)
            marks = [bool(c) for c in rec["verify"].correct[:grid_n]] if shapes_world else None
            labels = {"row_labels": _short(prompts[:rows]), "col_labels": [f"sample {k + 1}" for k in range(K)]}
            if rec["grid_images"].ndim == 5:  # videos: an animated grid and a strip of frames per sample
                name = f"images_{label}.{video_format('auto')}"
                save_video_grid(rec["grid_images"], out_dir / name, K, rec["fps"] or 8.0, **labels)
                save_frame_strips(rec["grid_images"], out_dir / f"strips_{label}.png",
                                  row_labels=_short([p for p in prompts[:rows] for _ in range(K)]))
                entry["strips"] = f"strips_{label}.png"
            else:
                name = f"images_{label}.png"
                save_grid(rec["grid_images"], out_dir / name, K, marks=marks, **labels)
            entry["grid"] = name
        result_models[label] = entry

    return {
        "version": RESULT_VERSION,
        "prompts": prompts,
        "seeds_per_prompt": K,
        "seed": seed,
        "sampling": settings,
        "rewards": reward_names,
        "target": target,
        "heldout": [n for n in reward_names if n != target] if target is not None else [],
        "base": base,
        "shapes_world": shapes_world,
        "encoder": ENCODER_NAME,
        "grid_prompts": min(grid_prompts, P),
        "models": result_models,
        "definitions": DEFINITIONS,
    }


def _short(labels: Sequence[str], width: int = 48) -> list[str]:
    return [s if len(s) <= width else s[:width - 1] + "…" for s in labels]


def save_eval(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``result`` as JSON (atomically; NaN/inf are refused so the file stays standard JSON)."""
    text = json.dumps(result, indent=2, allow_nan=False)
    return atomic_write(path, lambda f: f.write((text + "\n").encode()))


def load_eval(path: str | Path) -> dict[str, Any]:
    """Read an ``eval.json`` written by :func:`save_eval`; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation file not found: {path}")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(result, dict) or not isinstance(result.get("models"), dict):
        raise ValueError(f"{path} is not a diffalign evaluation: expected an object with a 'models' mapping")
    if result.get("version") != RESULT_VERSION:
        raise ValueError(f"{path}: evaluation format version {result.get('version')!r} is not supported "
                         f"(expected {RESULT_VERSION})")
    return result
