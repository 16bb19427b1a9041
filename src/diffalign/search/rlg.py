"""RLG: reward-guided mixing of a base and an RL fine-tuned model at sampling time.

"Reinforcement Learning Guidance" (2025, "...adapts Classifier-Free Guidance by combining the
outputs of the base and RL fine-tuned models via a geometric average"): sample from
``p_w(x) ~ p_base(x)^(1-w) p_tuned(x)^w``, whose score is the linear mix of the two scores, so
every step uses

    eps_RLG = eps_base + w (eps_tuned - eps_base)

on the two models' raw predictions of the same type (the fine-tuned model's output is converted
to the base's prediction type first; every type is affine in ``(x0, eps)`` with shared
coefficients, so mixing any of them is the same operation). ``w = 1`` is the fine-tuned model,
``w = 0`` the base, ``w > 1`` extrapolates past the fine-tuned model (in the paper's analysis, a
smaller KL coefficient of the RL objective), ``0 < w < 1`` interpolates. Classifier-free
guidance applies on top, per model, as usual (it is linear too).

Cost: both networks run at every step: **2 NFE per sample and step**. With a budget of several
samples' worth, :func:`rlg` spends it as best-of-``n`` under the reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from ..config import check_range
from ..core.parametrization import convert
from ..models import load_model
from .base import Counted, SearchResult
from .best_of_n import best_of_n


class RLGDenoiser:
    """A denoiser whose prediction is ``base + weight * (tuned - base)``; counts both networks."""

    def __init__(self, base: Any, tuned: Any, weight: float):
        check_range("weight", weight)
        if base.schedule != tuned.schedule:
            raise ValueError(f"rlg: the base and fine-tuned models must share a noise schedule, got "
                             f"{base.schedule} and {tuned.schedule}")
        if tuple(getattr(base, "sample_shape", ())) != tuple(getattr(tuned, "sample_shape", ())):
            raise ValueError(f"rlg: sample shapes differ: {base.sample_shape} vs {tuned.sample_shape}")
        self.base, self.tuned = Counted(base), Counted(tuned)
        self.counted_networks = (self.base, self.tuned)
        self.nfe_per_eval = 2  # both networks run at every evaluation
        self.weight = float(weight)
        self.prediction_type = base.prediction_type
        self.schedule = base.schedule
        self.sample_shape = tuple(base.sample_shape)
        self.sampling_defaults = getattr(base, "sampling_defaults", None)

    def parameters(self):
        return self.base.net.parameters()

    def encode_prompts(self, prompts: list[str]) -> tuple[Any, Any]:
        return self.base.net.encode_prompts(prompts), self.tuned.net.encode_prompts(prompts)

    def decode(self, x: Tensor) -> Tensor:
        return self.base.net.decode(x)

    def __call__(self, x_t: Tensor, t: Tensor, cond: tuple[Any, Any]) -> Tensor:
        c_base, c_tuned = cond
        out_base = self.base(x_t, t, c_base)
        out_tuned = self.tuned(x_t, t, c_tuned)
        if self.tuned.prediction_type != self.prediction_type:
            alpha, sigma = self.schedule.alpha_sigma(t)
            out_tuned = convert(out_tuned, x_t, alpha, sigma, self.tuned.prediction_type, self.prediction_type)
        return out_base + self.weight * (out_tuned - out_base)


def resolve_tuned(path: str | Path, device: Any = "cpu") -> Any:
    """Load a fine-tuned model: a model directory, or a ``diffalign train`` run directory (its
    ``final/`` model)."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "final" / "config.json").is_file():
        p = p / "final"
    return load_model(p, device=device)


def rlg(model: Any, tuned: Any, prompts: Sequence[str], reward: Any, *, budget: int, weight: float = 1.5,
        num_images_per_prompt: int = 1, n: int | None = None, sampler: str | None = None,
        num_steps: int | None = None, guidance_scale: float | None = None, eta: float | None = None,
        seed: int = 0, max_batch: int = 256) -> SearchResult:
    """Sample the RLG mixture of ``model`` (base) and ``tuned`` (a model, a model directory or a
    ``diffalign train`` run directory) with guidance ``weight``; ``n`` candidates per image
    (default: as many as the budget buys at 2 NFE per step) with the best under ``reward`` kept.

    trace: that of :func:`best_of_n` plus ``rlg_weight``.
    """
    if isinstance(tuned, (str, Path)):
        tuned = resolve_tuned(tuned, device=next(model.parameters()).device)
    mix = RLGDenoiser(model, tuned, weight)
    res = best_of_n(mix, prompts, reward, budget=budget, num_images_per_prompt=num_images_per_prompt, n=n,
                    sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale, eta=eta, seed=seed,
                    max_batch=max_batch)
    res.trace.update(method="rlg", rlg_weight=mix.weight)
    return res
