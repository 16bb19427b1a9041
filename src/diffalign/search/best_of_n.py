"""Best-of-N (rejection sampling against a reward): draw ``n`` independent samples per image and
keep the one the reward scores highest -- the baseline every inference-time search is measured
against (e.g. Ma et al. 2025, "Inference-Time Scaling for Diffusion Models beyond Scaling
Denoising Steps", random search over noises; Singhal et al. 2025 compare FK steering to it).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import (Engine, SearchResult, candidate_generator, check_count, expand_prompts, finish, get_reward,
                   per_image_budget, resolve_settings, run_chains)


def best_of_n(model: Any, prompts: Sequence[str], reward: Any, *, budget: int, num_images_per_prompt: int = 1,
              n: int | None = None, sampler: str | None = None, num_steps: int | None = None,
              guidance_scale: float | None = None, eta: float | None = None, seed: int = 0,
              max_batch: int = 256) -> SearchResult:
    """Best of ``n`` samples per output image; ``n`` defaults to as many as the budget buys
    (``budget // (N * num_steps)``). Candidate ``k`` of image ``i`` is an ordinary sample from
    :func:`~diffalign.search.base.candidate_generator` ``(seed + i, k)``.

    trace: ``n``, ``candidate_scores [N, n]``, ``chosen [N]``.
    """
    reward = get_reward(reward)
    image_prompts, seeds = expand_prompts(prompts, num_images_per_prompt, seed)
    s = resolve_settings(model, sampler, num_steps, guidance_scale, eta, method="best_of_n")
    T, N = s.num_steps, len(image_prompts)
    per = per_image_budget(budget, N, T, "best_of_n", f"one {T}-step sample", model=model)
    if n is None:
        n = per // T
    check_count("n", n)
    if n * T > per:
        c = int(getattr(model, "nfe_per_eval", 1))
        raise ValueError(f"best_of_n: n={n} samples of {T} steps cost {n * T * c} NFE per image, over the "
                         f"{per * c} NFE per image the budget {budget} allows for {N} images")
    eng = Engine(model, image_prompts, s, reward, max_batch=max_batch)
    rows = torch.arange(N).repeat_interleave(n)
    gens = [candidate_generator(seeds[i], k) for i in range(N) for k in range(n)]
    x0 = run_chains(eng, eng.init_noise(gens), rows, gens)
    scores = eng.score(x0, rows).view(N, n)
    chosen = scores.argmax(dim=1)
    pick = torch.arange(N) * n + chosen
    return finish(eng, "best_of_n", budget, x0[pick.to(x0.device)], scores[torch.arange(N), chosen], image_prompts,
                  seeds, {"n": n, "candidate_scores": scores, "chosen": chosen})
