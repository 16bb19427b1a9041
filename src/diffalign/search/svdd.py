"""SVDD: soft value-based decoding.

Li, Zhao, Biancalani, Regev, Levine & Uehara 2024, "Derivative-Free Guidance in Continuous and
Discrete Diffusion Models with Soft Value-Based Decoding" (Algorithm 1, SVDD-PM). At every step
``t`` draw ``M`` candidates ``x_{t-1}^{<m>} ~ p^pre_{t-1}(. | x_t)``, estimate each one's soft
value by the reward of its posterior mean, ``v_{t-1}(x_{t-1}) ~= r(x0_hat(x_{t-1}))`` (SVDD-PM:
no value network), and keep ``x_{t-1} = x_{t-1}^{<zeta>}`` with
``zeta ~ Categorical(softmax(v^{<m>} / alpha))``; ``alpha -> 0`` is the argmax (the paper's
recommended small-``alpha`` regime). The target is ``p^pre(x_0) exp(r(x_0) / alpha)``.

Cost: ``1 + M (T - 1)`` NFE per image -- each candidate needs one evaluation for its ``x0_hat``,
which the kept candidate reuses for its next step; the last step's candidates are clean samples
and are valued by the reward itself.
"""

from __future__ import annotations

from typing import Any, Sequence

from .base import SearchResult
from .beam import lookahead_search


def svdd(model: Any, prompts: Sequence[str], reward: Any, *, budget: int, num_images_per_prompt: int = 1,
         num_candidates: int | None = None, alpha: float = 0.0, sampler: str | None = None,
         num_steps: int | None = None, guidance_scale: float | None = None, eta: float | None = None, seed: int = 0,
         max_batch: int = 256) -> SearchResult:
    """SVDD-PM with ``num_candidates`` (``M``, default: as many as the budget buys) candidates per
    step and selection temperature ``alpha`` (0 = argmax). The sampler must be stochastic (a
    deterministic default becomes its SDE counterpart).

    trace: ``num_candidates``, ``selected_value_mean`` (per step), ``final_candidate_scores``.
    """
    return lookahead_search("svdd", model, prompts, reward, budget=budget, num_images_per_prompt=num_images_per_prompt,
                            beam_width=1, num_candidates=num_candidates, block_size=1, lookahead_steps=1, alpha=alpha,
                            sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale, eta=eta, seed=seed,
                            max_batch=max_batch)
