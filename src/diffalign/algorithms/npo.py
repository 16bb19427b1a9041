"""Diffusion-NPO (Wang et al. 2025, "Diffusion-NPO: Negative Preference Optimization for Better
Preference Aligned Generation of Diffusion Models").

Classifier-free guidance moves a sample along ``c - u``, the conditional prediction minus the
unconditional one. Diffusion-NPO trains a *negative-preference* model -- an existing preference
method with winner and loser swapped, here Diffusion-DPO -- and uses it for the unconditional
branch at sampling time::

    prediction = u_neg + w (c_theta - u_neg),   u_neg = negative_model(x_t, t, empty prompt)

so guidance also pushes away from what people dislike. The positive model ``theta`` is the base
(or an already aligned) model; training leaves it untouched. At sampling time pass the trained
model as ``negative_model`` to :func:`diffalign.core.sampling.sample` or ``generate``.

``diffalign train`` with ``method: npo`` writes the negative model to ``RUN/final``; its own
held-out accuracy *drops* (it is trained to prefer wrong images), so judge it with the base model
guided by it (``docs/algorithms/preference.md`` and ``benchmarks/bench_preference.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .preference import DiffusionDPO, DPOConfig, PairBatch


@dataclass
class NPOConfig(DPOConfig):
    beta: float = 500.0  # beta of the swapped Diffusion-DPO (the authors' SD 1.5 negative model: 500)


class DiffusionNPO(DiffusionDPO):
    """Diffusion-DPO on swapped pairs: the rejected sample is the preferred one."""

    name = "npo"

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> PairBatch:
        batch = super().collect(model, prompts, epoch=epoch, seed=seed)
        batch.chosen, batch.rejected = batch.rejected, batch.chosen
        return batch


PRESETS: dict[str, tuple[type, type, dict]] = {"npo": (NPOConfig, DiffusionNPO, {})}
