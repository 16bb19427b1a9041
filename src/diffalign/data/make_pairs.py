"""On-policy preference pairs from any reward (``diffalign make-pairs``).

Each prompt gets ``K`` images from the model's sampler (image ``k`` of prompt ``i`` uses seed
``seed + i * K + k``), the reward scores them, and pairs are chosen among the prompt's images:

* ``mode="best_worst"`` (default): the highest- against the lowest-scoring image, kept when the
  score gap exceeds ``min_gap`` -- one pair per prompt at most. This is how Diffusion-DPO's
  AI-feedback variant (Wallace et al. 2023) and D3PO (Yang et al. 2024) build pairs from a scorer.
* ``mode="all"``: every pair ``(a, b)`` of the prompt's images with ``score_a - score_b > min_gap``,
  ``a`` chosen -- up to ``K (K - 1) / 2`` pairs per prompt.

A prompt whose images all score within ``min_gap`` of each other gives no pair (with the default
``min_gap = 0``: when all its images score the same), so no pair is ever a tie. Scores are taken on
the images as they are saved (``uint8``), so re-scoring the written PNGs gives the same numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..config import check_choice, check_range
from ..core.sampling import generate
from .pairs import PAIRS_FILE, PreferencePair, write_jsonl_pairs

MODES = ("best_worst", "all")


def select_pairs(scores: np.ndarray, mode: str = "best_worst", min_gap: float = 0.0) -> list[list[tuple[int, int]]]:
    """For scores ``[P, K]``, the ``(chosen, rejected)`` image indices of each prompt's pairs.

    ``best_worst``: ``(argmax, argmin)`` when ``max - min > min_gap`` (first index on equal scores);
    ``all``: every ``(a, b)`` with ``scores[a] - scores[b] > min_gap``, in index order.
    """
    check_choice("mode", mode, MODES)
    check_range("min_gap", min_gap, 0, None)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [num_prompts, K] with K >= 2, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite; the reward returned NaN or inf")
    out = []
    for s in scores:
        if mode == "best_worst":
            a, b = int(np.argmax(s)), int(np.argmin(s))
            out.append([(a, b)] if s[a] - s[b] > min_gap else [])
        else:
            out.append([(a, b) for a in range(len(s)) for b in range(len(s)) if s[a] - s[b] > min_gap])
    return out


@dataclass
class ScoredSamples:
    """``K`` images per prompt, as saved (``uint8 [P, K, H, W, 3]``), their scores ``[P, K]`` and seeds."""

    prompts: list[str]
    images: np.ndarray
    scores: np.ndarray
    seeds: np.ndarray
    sampling: dict[str, Any]


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_and_score(model: Any, prompts: Sequence[str], reward: Callable, per_prompt: int, seed: int = 0, *,
                     sampling: Mapping[str, Any] | None = None, batch_size: int = 256) -> ScoredSamples:
    """Generate ``per_prompt`` images per prompt with ``sampling`` (default: the model's
    ``sampling_defaults``) and score their ``uint8`` versions with ``reward``."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
    check_range("per_prompt", per_prompt, 2, None, integer=True)
    check_range("seed", seed, 0, None, integer=True)
    check_range("batch_size", batch_size, 1, None, integer=True)
    if sampling is None:
        if not hasattr(model, "sampling_defaults"):
            raise ValueError("model has no sampling_defaults; pass sampling={'sampler', 'num_steps', "
                             "'guidance_scale', 'eta'}")
        sampling = model.sampling_defaults
    sampling = dict(sampling)
    prompts = list(prompts)
    flat = [p for p in prompts for _ in range(per_prompt)]
    seeds = [seed + i for i in range(len(flat))]
    pixels = _to_uint8(generate(model, flat, seeds, batch_size=batch_size, **sampling))
    device = next(model.parameters()).device if hasattr(model, "parameters") else torch.device("cpu")
    scores = []
    with torch.no_grad():
        for i in range(0, len(flat), batch_size):
            x = torch.from_numpy(pixels[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
            scores.append(torch.as_tensor(reward(x, flat[i:i + batch_size])).detach().double().cpu().reshape(-1))
    scores = torch.cat(scores).numpy()
    if scores.shape[0] != len(flat):
        raise ValueError(f"reward returned {scores.shape[0]} scores for {len(flat)} images")
    P, K = len(prompts), per_prompt
    return ScoredSamples(prompts, pixels.reshape(P, K, *pixels.shape[1:]), scores.reshape(P, K),
                         np.asarray(seeds).reshape(P, K), sampling)


def _reward_name(reward: Any) -> str:
    return str(getattr(reward, "name", type(reward).__name__))


def pairs_from_samples(samples: ScoredSamples, selection: list[list[tuple[int, int]]],
                       annotator: str) -> list[PreferencePair]:
    """The :class:`PreferencePair` s that ``selection`` picks; ids are ``p{prompt:05d}_{a}v{b}``."""
    return [PreferencePair(samples.prompts[i], samples.images[i, a], samples.images[i, b], annotator=annotator,
                           pair_id=f"p{i:05d}_{a}v{b}")
            for i, chosen in enumerate(selection) for a, b in chosen]


def make_pairs(model: Any, prompts: Sequence[str], reward: Callable | str, per_prompt: int, seed: int = 0, *,
               mode: str = "best_worst", min_gap: float = 0.0, sampling: Mapping[str, Any] | None = None,
               batch_size: int = 256) -> list[PreferencePair]:
    """On-policy preference pairs of ``model`` on ``prompts`` ranked by ``reward`` (a reward callable
    or a registered reward name). See the module docstring for ``mode`` and ``min_gap``; pairs are
    annotated ``"reward:<name>"``. Deterministic for a given seed and batch size."""
    check_choice("mode", mode, MODES)
    check_range("min_gap", min_gap, 0, None)
    if isinstance(reward, str):
        from .. import rewards

        reward = rewards.get(reward)
    samples = sample_and_score(model, prompts, reward, per_prompt, seed, sampling=sampling, batch_size=batch_size)
    return pairs_from_samples(samples, select_pairs(samples.scores, mode, min_gap), f"reward:{_reward_name(reward)}")


def make_pairs_to_dir(model: Any, prompts: Sequence[str], reward: Callable, out: str | os.PathLike, *,
                      per_prompt: int, seed: int = 0, mode: str = "best_worst", min_gap: float = 0.0,
                      sampling: Mapping[str, Any] | None = None, batch_size: int = 256) -> dict[str, Any]:
    """:func:`make_pairs` written to ``out/pairs.jsonl`` + ``out/images/`` (each line also carries
    ``chosen_score``, ``rejected_score``, ``chosen_seed``, ``rejected_seed``). Returns a summary."""
    check_choice("mode", mode, MODES)
    check_range("min_gap", min_gap, 0, None)
    samples = sample_and_score(model, prompts, reward, per_prompt, seed, sampling=sampling, batch_size=batch_size)
    selection = select_pairs(samples.scores, mode, min_gap)
    pairs = pairs_from_samples(samples, selection, f"reward:{_reward_name(reward)}")
    extra = [{"chosen_score": float(samples.scores[i, a]), "rejected_score": float(samples.scores[i, b]),
              "chosen_seed": int(samples.seeds[i, a]), "rejected_seed": int(samples.seeds[i, b])}
             for i, chosen in enumerate(selection) for a, b in chosen]
    path = write_jsonl_pairs(pairs, Path(out) / PAIRS_FILE, extra=extra)
    gaps = [e["chosen_score"] - e["rejected_score"] for e in extra]
    return {"path": str(path), "pairs": len(pairs), "prompts": len(samples.prompts), "per_prompt": per_prompt,
            "prompts_without_pair": sum(not s for s in selection), "mean_score": float(samples.scores.mean()),
            "mean_gap": float(np.mean(gaps)) if gaps else 0.0, "reward": _reward_name(reward), "mode": mode,
            "min_gap": min_gap, "sampling": samples.sampling}
