"""Feynman-Kac steering: sequential Monte Carlo with reward potentials.

Singhal, Horvitz, Teehan, Ren, Yu, McKeown & Ranganath 2025, "A General Framework for
Inference-time Scaling and Steering of Diffusion Models" (FK steering). ``k`` particles
``x_T^i`` are propagated by the model's stochastic sampler ``tau(x_{t-1} | x_t) = p_theta``
(the proposal) and reweighted by potentials ``G_t`` built from intermediate rewards
``r_phi(x_t) = r(decode(x0_hat(x_t)))`` on the model's own prediction of the clean sample (no
extra model call: ``x0_hat`` comes from the evaluation the next step needs anyway). The target
is the tilted distribution ``p_theta(x_0) exp(lambda r(x_0)) / Z``. Potentials (Sec. 3):

- ``difference``: ``G_t = exp(lambda (r_phi(x_t) - r_phi(x_{t+1})))`` (first one against 0);
- ``max``: ``G_t = exp(lambda max_{s >= t} r_phi(x_s))``;
- ``sum``: ``G_t = exp(lambda sum_{s >= t} r_phi(x_s))``;

and a final potential ``G_0 = exp(lambda r(x_0)) / prod_{t >= 1} G_t`` (over each particle's
ancestral path) so that the product of all potentials is ``exp(lambda r(x_0))`` whatever the
choice: the final weights target the tilted distribution exactly (for ``difference`` it is
``exp(lambda (r(x_0) - r_phi(x_last)))``). Potentials are evaluated on a resampling schedule
(``resample_every`` steps within ``resample_interval``); weights accumulate between resamplings,
and particles are resampled (multinomial or systematic) only when the effective sample size
``ESS = 1 / sum_i w_i^2`` falls below ``ess_threshold * k`` (adaptive resampling, Del Moral et al.
2012). After resampling the weights are uniform again.

``lambda = 0`` makes every potential 1: no resampling ever happens and the particles are
exactly ``k`` independent samples of the sampler (particle ``k`` of image ``i`` is the sample
drawn from ``candidate_generator(seed + i, k)``, the same noise best-of-N uses).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ..config import check_choice, check_range
from .base import (Engine, SearchResult, candidate_generator, check_count, expand_prompts, finish, get_reward,
                   method_generator, per_image_budget, resolve_settings)

POTENTIALS = ("difference", "max", "sum")
RESAMPLERS = ("multinomial", "systematic")


def ess(weights: Tensor, *, log: bool = False) -> Tensor:
    """Effective sample size ``(sum w)^2 / sum w^2`` over the last dim (``k`` for uniform weights,
    1 for one-hot). ``log=True`` takes log-weights (``-inf`` allowed)."""
    w = torch.softmax(weights.double(), dim=-1) if log else weights.double() / weights.double().sum(-1, keepdim=True)
    return 1.0 / (w**2).sum(-1)


def resample(log_weights: Tensor, method: str, generators: Sequence[torch.Generator]) -> Tensor:
    """Ancestor indices ``[N, k]`` for log-weights ``[N, k]`` (one generator per row).

    ``multinomial``: ``k`` i.i.d. draws from ``Cat(w)``. ``systematic`` (Kitagawa 1996): one
    ``u ~ U[0, 1)`` per row and the points ``(u + j) / k``; lower variance, and the identity
    when the weights are uniform."""
    check_choice("resample", method, RESAMPLERS)
    N, K = log_weights.shape
    w = torch.softmax(log_weights.double(), dim=-1)
    out = torch.empty(N, K, dtype=torch.long)
    for i in range(N):
        if method == "multinomial":
            out[i] = torch.multinomial(w[i], K, replacement=True, generator=generators[i])
        else:
            u = torch.rand((), generator=generators[i], dtype=torch.float64)
            points = (u + torch.arange(K, dtype=torch.float64)) / K
            out[i] = torch.searchsorted(torch.cumsum(w[i], 0), points, right=True).clamp_max(K - 1)
    return out


def smc(model: Any, prompts: Sequence[str], reward: Any, *, budget: int, num_images_per_prompt: int = 1,
        num_particles: int | None = None, potential: str = "max", lam: float = 10.0, resampler: str = "systematic",
        ess_threshold: float = 0.5, resample_every: int = 1, resample_interval: tuple[int, int] | None = None,
        select: str = "best", sampler: str | None = None, num_steps: int | None = None,
        guidance_scale: float | None = None, eta: float | None = None, seed: int = 0, keep_particles: bool = False,
        max_batch: int = 256) -> SearchResult:
    """FK steering with ``num_particles`` (``k``) particles per image; ``k`` defaults to as many as
    the budget buys (``budget // (N * num_steps)``).

    potential / lam: the potential and its temperature ``lambda`` (0 = independent sampling).
    resampler: ``multinomial`` or ``systematic``; ess_threshold: resample when ``ESS < thr * k``
        (1 = whenever the weights are not uniform, 0 = never).
    resample_every / resample_interval: potentials are evaluated (and resampling considered) at
        grid points ``j`` in ``[start, stop)`` with ``(j - start) % resample_every == 0``;
        default interval: every step ``[0, num_steps)``.
    select: ``best`` returns the particle of highest final reward, ``sample`` draws one from the
        final weights (a sample of the tilted distribution).
    The sampler must be stochastic; a deterministic default (``flow_ode``) becomes ``flow_sde``.

    trace: ``num_particles``, ``ess [N, steps]`` (before resampling, NaN where not evaluated),
    ``resampled [N, steps]`` bool, ``num_resamples``, ``weights [N, k]`` (final, normalised),
    ``particle_scores [N, k]``, ``chosen``; with ``keep_particles`` ``particles [N, k, 3, H, W]``.
    """
    reward = get_reward(reward)
    check_choice("potential", potential, POTENTIALS)
    check_choice("resampler", resampler, RESAMPLERS)
    check_choice("select", select, ("best", "sample"))
    check_range("lam", lam, 0, None)
    check_range("ess_threshold", ess_threshold, 0, 1)
    check_count("resample_every", resample_every)
    image_prompts, seeds = expand_prompts(prompts, num_images_per_prompt, seed)
    s = resolve_settings(model, sampler, num_steps, guidance_scale, eta, stochastic=True, method="smc")
    T, N = s.num_steps, len(image_prompts)
    start, stop = resample_interval if resample_interval is not None else (0, T)
    check_range("resample_interval start", start, 0, T, integer=True)
    check_range("resample_interval stop", stop, start, T, integer=True)
    per = per_image_budget(budget, N, T, "smc", f"one particle of {T} steps", model=model)
    K = per // T if num_particles is None else num_particles
    check_count("num_particles", K)
    if K * T > per:
        raise ValueError(f"smc: {K} particles of {T} steps cost {K * T} NFE per image, over the {per} NFE per "
                         f"image the budget {budget} allows for {N} images")
    potential_steps = {j for j in range(start, stop) if (j - start) % resample_every == 0}

    eng = Engine(model, image_prompts, s, reward, max_batch=max_batch)
    rows = torch.arange(N).repeat_interleave(K)
    gens = [candidate_generator(seeds[i], k) for i in range(N) for k in range(K)]
    mgens = [method_generator(sd) for sd in seeds]
    logw = torch.zeros(N, K, dtype=torch.float64)  # log-weights since the last resampling
    log_g_path = torch.zeros(N, K, dtype=torch.float64)  # log prod of all potentials on the ancestral path
    r_prev = torch.zeros(N, K, dtype=torch.float64)
    r_max = torch.full((N, K), -math.inf, dtype=torch.float64)
    r_sum = torch.zeros(N, K, dtype=torch.float64)
    ess_trace = torch.full((N, T), math.nan, dtype=torch.float64)
    resampled = torch.zeros(N, T, dtype=torch.bool)
    with torch.no_grad():
        x = eng.init_noise(gens)
        for j in range(T):
            out = eng.predict(x, j, rows)
            if j in potential_steps and lam > 0:
                r = eng.score(eng.x0_hat(x, out, j), rows).double().view(N, K)
                if potential == "difference":
                    log_g, r_prev = lam * (r - r_prev), r
                elif potential == "max":
                    r_max = torch.maximum(r_max, r)
                    log_g = lam * r_max
                else:
                    r_sum = r_sum + r
                    log_g = lam * r_sum
                logw, log_g_path = logw + log_g, log_g_path + log_g
                e = ess(logw, log=True)
                ess_trace[:, j] = e
                need = e < ess_threshold * K - 1e-9
                if need.any():
                    anc = resample(logw, resampler, mgens)
                    anc[~need] = torch.arange(K)  # rows that keep their particles
                    flat = (torch.arange(N)[:, None] * K + anc).view(-1)
                    x, out = x[flat.to(x.device)], out[flat.to(out.device)]
                    r_prev, r_max, r_sum, log_g_path = (v.view(-1)[flat].view(N, K)
                                                        for v in (r_prev, r_max, r_sum, log_g_path))
                    logw = torch.where(need[:, None], torch.zeros_like(logw), logw)
                    resampled[:, j] = need
            elif j in potential_steps:
                ess_trace[:, j] = float(K)
            x = eng.step(x, out, j, eng.noise(gens))
    r0 = eng.score(x, rows).view(N, K)
    logw = logw + lam * r0.double() - log_g_path  # the final potential G_0
    weights = torch.softmax(logw, dim=1)
    if select == "best":
        chosen = r0.argmax(dim=1)
    else:
        chosen = torch.stack([torch.multinomial(weights[i], 1, generator=mgens[i])[0] for i in range(N)])
    pick = torch.arange(N) * K + chosen
    trace = {"num_particles": K, "potential": potential, "lam": lam, "resampler": resampler,
             "ess": ess_trace, "resampled": resampled, "num_resamples": int(resampled.sum()),
             "weights": weights.float(), "particle_scores": r0, "chosen": chosen}
    if keep_particles:
        with torch.no_grad():
            imgs = eng.decode(x).float().cpu()
            trace["particles"] = imgs.view(N, K, *imgs.shape[1:])
    return finish(eng, "smc", budget, x[pick.to(x.device)], r0[torch.arange(N), chosen], image_prompts, seeds, trace)
