"""Beam search over the denoising chain with a lookahead value estimate.

Diffusion Latent Beam Search (DLBS; Oshima et al. 2025, "Inference-Time Text-to-Video
Alignment with Diffusion Latent Beam Search"): keep ``B`` beams; at each step
expand every beam ``x_t`` into ``K`` candidates ``x_{t-1} ~ p_theta(. | x_t)`` (different noise),
score each candidate with a *lookahead estimator* -- the reward of a short deterministic
rollout ``x_{t-1} -> x_0`` in ``L`` ODE/DDIM steps -- and keep the ``B`` best of the ``B K``.

CoDe (2025, "CoDe: Blockwise Control for Denoising Diffusion Models") is the
blockwise special case: one beam, ``K`` candidates that each run ``block_size`` steps, scored by
the reward of the one-step prediction ``x0_hat`` (``L = 1``), best kept.

NFE accounting: the ``K`` children of a beam share the beam's model evaluation (only the noise
differs); the lookahead's first evaluation at a candidate is the one a surviving candidate needs
for its next step anyway, so it is cached and not paid twice. A block of ``n`` steps with a
lookahead of ``L`` steps costs ``(n - 1) B K + L B K`` (no lookahead after the last block:
final candidates are scored by the reward itself), plus ``B`` for the first evaluation.

:func:`~diffalign.search.svdd.svdd` reuses this loop with ``B = 1``, ``n = L = 1`` and a softmax
selection.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..config import check_range
from .base import (Engine, SearchResult, candidate_generator, check_count, expand_prompts, finish, get_reward,
                   method_generator, per_image_budget, resolve_settings, select_rows)


def lookahead_cost(num_steps: int, beam_width: int, num_candidates: int, block_size: int, lookahead_steps: int) -> int:
    """NFE per image of :func:`beam_search` with these settings."""
    T, B, K = num_steps, beam_width, num_candidates
    cost, j = B, 0
    while j < T:
        n = min(block_size, T - j)
        j += n
        cost += (n - 1) * B * K
        if j < T:
            cost += B * K * min(lookahead_steps, T - j)
    return cost


def lookahead_search(method: str, model: Any, prompts: Sequence[str], reward: Any, *, budget: int,
                     num_images_per_prompt: int, beam_width: int, num_candidates: int | None, block_size: int,
                     lookahead_steps: int, alpha: float, sampler: str | None, num_steps: int | None,
                     guidance_scale: float | None, eta: float | None, seed: int, max_batch: int) -> SearchResult:
    """The shared loop of beam search / CoDe / SVDD (see the module docstring)."""
    reward = get_reward(reward)
    check_count("beam_width", beam_width)
    check_count("block_size", block_size)
    check_count("lookahead_steps", lookahead_steps)
    check_range("alpha", alpha, 0, None)
    image_prompts, seeds = expand_prompts(prompts, num_images_per_prompt, seed)
    s = resolve_settings(model, sampler, num_steps, guidance_scale, eta, stochastic=True, method=method)
    T, N, B, k, L = s.num_steps, len(image_prompts), beam_width, block_size, lookahead_steps
    cost1 = lookahead_cost(T, B, 1, k, L)
    per = per_image_budget(budget, N, cost1, method, f"beam width {B} with one candidate per beam, {T} steps",
                           model=model)
    if num_candidates is None:
        K = 1
        while lookahead_cost(T, B, K + 1, k, L) <= per:
            K += 1
    else:
        K = check_count("num_candidates", num_candidates)
        if lookahead_cost(T, B, K, k, L) > per:
            raise ValueError(f"{method}: {K} candidates per beam cost {lookahead_cost(T, B, K, k, L)} NFE per image, "
                             f"over the {per} NFE per image the budget {budget} allows for {N} images")
    eng = Engine(model, image_prompts, s, reward, max_batch=max_batch)
    streams = [candidate_generator(sd, 0) for sd in seeds]
    mgens = [method_generator(sd) for sd in seeds]
    beam_rows = torch.arange(N).repeat_interleave(B)
    cand_rows = torch.arange(N).repeat_interleave(B * K)
    values, j = [], 0
    with torch.no_grad():
        x = eng.init_noise([streams[i] for i in beam_rows.tolist()])
        out = eng.predict(x, 0, beam_rows)
        while True:
            n = min(k, T - j)
            xc, oc = x.repeat_interleave(K, dim=0), out.repeat_interleave(K, dim=0)
            for a in range(n):
                if a > 0:
                    oc = eng.predict(xc, j + a, cand_rows)
                xc = eng.step(xc, oc, j + a, eng.noise([streams[i] for i in cand_rows.tolist()]))
            j += n
            if j == T:
                break
            oc = eng.predict(xc, j, cand_rows)  # cached: the survivors' next step reuses it
            v = eng.score(_lookahead(eng, xc, oc, j, L, cand_rows), cand_rows).view(N, B * K)
            sel = select_rows(v, B, alpha=alpha, generators=mgens)
            values.append(v.gather(1, sel).mean().item())
            flat = (torch.arange(N)[:, None] * (B * K) + sel).view(-1).to(xc.device)
            x, out = xc[flat], oc[flat]
        final = eng.score(xc, cand_rows).view(N, B * K)
    chosen = select_rows(final, 1, alpha=alpha, generators=mgens)[:, 0]
    pick = (torch.arange(N) * (B * K) + chosen).to(xc.device)
    trace = {"beam_width": B, "num_candidates": K, "block_size": k, "lookahead_steps": L, "alpha": alpha,
             "selected_value_mean": values, "final_candidate_scores": final, "chosen": chosen}
    return finish(eng, method, budget, xc[pick], final[torch.arange(N), chosen], image_prompts, seeds, trace)


def _lookahead(eng: Engine, x: torch.Tensor, out: torch.Tensor, j: int, L: int, rows: torch.Tensor) -> torch.Tensor:
    """The lookahead estimate of ``x_0`` from ``x`` at grid point ``j``: ``L`` deterministic steps
    on grid points spread evenly over ``[j, T]`` (``L = 1``: the one-step prediction ``x0_hat``)."""
    T = eng.num_steps
    L = min(L, T - j)
    idx = torch.linspace(j, T, L + 1).round().long().tolist()
    for a in range(L):
        if a > 0:
            out = eng.predict(x, idx[a], rows)
        if a == L - 1:
            return eng.x0_hat(x, out, idx[a])  # the last deterministic step into t = 0 is x0_hat
        x = eng.ode_step(x, out, eng.ts[idx[a]], eng.ts[idx[a + 1]])
    raise AssertionError("unreachable")


def beam_search(model: Any, prompts: Sequence[str], reward: Any, *, budget: int, num_images_per_prompt: int = 1,
                beam_width: int = 2, num_candidates: int | None = None, block_size: int = 1,
                lookahead_steps: int = 2, sampler: str | None = None, num_steps: int | None = None,
                guidance_scale: float | None = None, eta: float | None = None, seed: int = 0,
                max_batch: int = 256) -> SearchResult:
    """DLBS-style beam search: ``beam_width`` beams, ``num_candidates`` children per beam (default:
    as many as the budget buys), one expansion every ``block_size`` steps, each child scored by
    the reward of a ``lookahead_steps``-step deterministic rollout to ``t = 0``. The sampler must
    be stochastic (a deterministic default becomes its SDE counterpart).

    trace: ``num_candidates``, ``selected_value_mean`` (per expansion), ``final_candidate_scores``.
    """
    return lookahead_search("beam", model, prompts, reward, budget=budget,
                            num_images_per_prompt=num_images_per_prompt, beam_width=beam_width,
                            num_candidates=num_candidates, block_size=block_size, lookahead_steps=lookahead_steps,
                            alpha=0.0, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale, eta=eta,
                            seed=seed, max_batch=max_batch)


def code(model: Any, prompts: Sequence[str], reward: Any, *, budget: int, num_images_per_prompt: int = 1,
         num_candidates: int | None = None, block_size: int = 2, sampler: str | None = None,
         num_steps: int | None = None, guidance_scale: float | None = None, eta: float | None = None, seed: int = 0,
         max_batch: int = 256) -> SearchResult:
    """CoDe (blockwise controlled decoding): one beam, ``num_candidates`` continuations of
    ``block_size`` steps, the one whose ``x0_hat`` the reward prefers is kept."""
    return lookahead_search("code", model, prompts, reward, budget=budget,
                            num_images_per_prompt=num_images_per_prompt, beam_width=1,
                            num_candidates=num_candidates, block_size=block_size, lookahead_steps=1, alpha=0.0,
                            sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale, eta=eta, seed=seed,
                            max_batch=max_batch)
