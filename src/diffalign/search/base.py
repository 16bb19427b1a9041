"""What every inference-time search method shares: the result type, the NFE counter, the sampling
settings, seeded noise streams, budgets, and a small step-by-step sampling engine.

**NFE convention** (all methods): ``nfe`` counts *per-sample guided denoiser evaluations* that
were really run. Evaluating the model on a batch of ``B`` states counts ``B``; with
classifier-free guidance the conditional and unconditional branches run in one batched call and
count **1** together (every method uses the same guidance, so comparisons are unaffected). The
counter sits on the network itself (:class:`Counted`): it counts the rows the network was called
on and divides by 2 under guidance, so nothing is estimated from a formula. A method that
evaluates two different networks per step (RLG: base and fine-tuned) spends 2 per sample and
step. Backward passes of the gradient methods are not NFE; they are reported as
``trace["backward_nfe"]`` (one per forward evaluation that was differentiated). Reward calls
(also the intermediate rewards on predicted ``x0``) are not NFE; ``trace["reward_calls"]``
counts the images scored.

**Budget**: ``budget`` is the total NFE for one call (all prompts and images). It is split evenly
between the ``N = len(prompts) * num_images_per_prompt`` output images, each searched
independently; a budget below ``N`` times one image's minimal cost raises ``ValueError`` naming
that minimum. ``result.nfe <= budget`` always.

**Randomness**: output image ``i`` has the seed ``seed + i``; every random draw for it comes from
generators seeded by :func:`stream_seed` of that seed, so an image depends only on its seed and
prompt, never on the batch it was searched in (up to float round-off of batched kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import rewards as rewards_lib
from ..config import check_range
from ..core.parametrization import cond_index, guided_prediction, to_x0_eps
from ..core.prompts import negative_prompts
from ..core.steps import DEFAULT_ETA, ODE_COUNTERPART, get_step

# stream tags: which purpose a generator serves (keys of stream_seed)
CANDIDATE, METHOD = 1, 2


@dataclass
class SearchResult:
    images: Tensor  # [N, 3, H, W] in [0, 1], float32 on the CPU
    scores: Tensor  # [N] reward of each returned image (the reward the search used)
    nfe: int  # per-sample guided denoiser evaluations really spent (see the module docstring)
    trace: dict = field(default_factory=dict)  # method-specific diagnostics
    prompts: list[str] = field(default_factory=list)  # prompt of each image (prompt-major order)
    seeds: list[int] = field(default_factory=list)  # seed of each image


@dataclass(frozen=True)
class Settings:
    sampler: str
    num_steps: int
    guidance_scale: float
    eta: float

    @property
    def stochastic(self) -> bool:
        return self.sampler != "flow_ode" and self.eta > 0


def stream_seed(image_seed: int, *keys: int) -> int:
    """A 63-bit seed for the random stream ``keys`` of the image with ``image_seed`` (numpy's
    ``SeedSequence``: distinct key tuples give independent streams)."""
    state = np.random.SeedSequence([int(image_seed), *(int(k) for k in keys)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def candidate_generator(image_seed: int, k: int) -> torch.Generator:
    """The generator of candidate / particle ``k`` of an image: it draws the initial noise
    ``x_1`` first, then one standard normal per sampling step -- exactly the draws
    ``core.sampling.sample(noise=x_1, generator=g)`` makes, so a candidate is an ordinary sample."""
    return torch.Generator().manual_seed(stream_seed(image_seed, CANDIDATE, k))


def method_generator(image_seed: int) -> torch.Generator:
    """The generator of an image's method-level choices (resampling, softmax selection, ...)."""
    return torch.Generator().manual_seed(stream_seed(image_seed, METHOD))


def draw(generators: Sequence[torch.Generator], shape: tuple[int, ...], device, dtype=torch.float32) -> Tensor:
    """One standard normal ``shape`` draw from each generator, stacked: ``[len(generators), *shape]``."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device=device, dtype=dtype)


class Counted:
    """Wraps a denoiser and counts the batch rows it is called on (``rows``); every other attribute
    is the wrapped model's."""

    def __init__(self, net: Any):
        self.net = net
        self.rows = 0

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        self.rows += int(x_t.shape[0])
        return self.net(x_t, t, cond)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["net"], name)


# ----- validation and settings --------------------------------------------------------------


def get_reward(reward: Any):
    """A reward object, or a registered reward name."""
    if isinstance(reward, str):
        return rewards_lib.get(reward)
    if not callable(reward):
        raise ValueError(f"reward must be a reward callable or a registered name, got {reward!r}")
    return reward


def reward_name(reward: Any) -> str:
    return getattr(reward, "name", getattr(reward, "__name__", type(reward).__name__))


def require_differentiable(reward: Any, method: str) -> None:
    if not getattr(reward, "differentiable", False):
        raise ValueError(f"{method} follows the reward's gradient, but reward {reward_name(reward)!r} is not "
                         f"differentiable; use a differentiable reward such as 'shapes_soft' or 'brightness', "
                         f"or a gradient-free method (best_of_n, smc, beam, svdd, dts)")


def resolve_settings(model: Any, sampler: str | None = None, num_steps: int | None = None,
                     guidance_scale: float | None = None, eta: float | None = None, *,
                     stochastic: bool = False, method: str = "search") -> Settings:
    """The model's ``sampling_defaults`` overridden by what was given. ``stochastic=True`` (methods
    that branch or resample) replaces a deterministic *default* sampler by its SDE counterpart
    (``flow_sde`` on a flow schedule, ``ddim`` with ``eta = 1`` otherwise) and rejects an explicitly
    requested deterministic one."""
    d = dict(getattr(model, "sampling_defaults", None) or {})
    s = sampler if sampler is not None else d.get("sampler", "flow_ode")
    get_step(s)  # validates the name
    n = num_steps if num_steps is not None else d.get("num_steps", 10)
    w = guidance_scale if guidance_scale is not None else d.get("guidance_scale", 1.0)
    e = eta if eta is not None else (d.get("eta") if sampler is None else None)
    e = DEFAULT_ETA[s] if e is None else e
    check_range("num_steps", n, 1, None, integer=True)
    check_range("guidance_scale", w)
    check_range("eta", e, 0, None)
    out = Settings(s, int(n), float(w), float(e))
    if stochastic and not out.stochastic:
        if sampler is not None or eta is not None:
            raise ValueError(f"{method} branches sampling paths and needs a stochastic sampler (flow_sde, dance_sde, "
                             f"cps, or ddim with eta > 0); got sampler={s!r} with eta={e}")
        if model.schedule.kind == "flow":
            out = Settings("flow_sde", out.num_steps, out.guidance_scale, DEFAULT_ETA["flow_sde"])
        else:
            out = Settings("ddim", out.num_steps, out.guidance_scale, 1.0)
    return out


def expand_prompts(prompts: Sequence[str] | str, num_images_per_prompt: int, seed: int) -> tuple[list[str], list[int]]:
    """Prompt-major list of the output images' prompts and seeds (``seed + i``)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    check_range("num_images_per_prompt", num_images_per_prompt, 1, None, integer=True)
    check_range("seed", seed, 0, None, integer=True)
    image_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
    return image_prompts, [seed + i for i in range(len(image_prompts))]


def per_image_budget(budget: int, n_images: int, min_cost: int, method: str, what: str, model: Any = None) -> int:
    """The per-image budget in model evaluations, after checking it covers ``min_cost`` evaluations
    for every image. A composite model that runs several networks per evaluation (RLG) declares
    ``nfe_per_eval``; budgets and minima in NFE are scaled by it."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise ValueError(f"{method}: budget must be an integer number of NFE, got {budget!r}")
    c = int(getattr(model, "nfe_per_eval", 1))
    minimum = min_cost * c * n_images
    if budget < minimum:
        raise ValueError(f"{method}: budget {budget} NFE is below the minimum of {minimum} NFE "
                         f"({what}: {min_cost * c} NFE for each of the {n_images} images)")
    return int(budget) // n_images // c


def check_count(name: str, value: int) -> int:
    return check_range(name, value, 1, None, integer=True)


def check_spent(method: str, nfe: int, budget: int) -> int:
    if nfe > budget:  # a bug, never an input error
        raise RuntimeError(f"{method} spent {nfe} NFE, over its budget of {budget}")
    return nfe


# ----- the step-by-step engine ----------------------------------------------------------------


class Engine:
    """Model calls, steps, ``x0`` predictions and rewards for rows of states.

    Each row belongs to an output image (``rows`` index into ``prompts``); conditionings are
    encoded once per image and indexed per call. Model calls are chunked into at most
    ``max_batch`` rows. ``nfe`` reads the :class:`Counted` networks.
    """

    def __init__(self, model: Any, prompts: list[str], settings: Settings, reward: Any = None,
                 max_batch: int = 256):
        self.model = model
        self.settings = settings
        self.prompts = prompts
        self.reward = reward
        self.max_batch = check_range("max_batch", max_batch, 1, None, integer=True)
        nets = getattr(model, "counted_networks", None)
        if nets is None:  # wrap the model itself
            self.net = Counted(model)
            self.counters = [self.net]
        else:  # a composite (RLG) that counts its own networks
            self.net, self.counters = model, list(nets)
        self.schedule = model.schedule
        self.prediction_type = model.prediction_type
        self.ts = self.schedule.timesteps(settings.num_steps)
        self.step_fn = get_step(settings.sampler)
        self.ode_fn = get_step(ODE_COUNTERPART[settings.sampler])
        self.device = _device(model)
        self.shape = tuple(model.sample_shape)
        self.reward_calls = 0
        with torch.no_grad():
            self.cond = model.encode_prompts(list(prompts))
            guided = settings.guidance_scale != 1.0
            self.uncond = model.encode_prompts(negative_prompts(prompts)) if guided else None

    @property
    def nfe(self) -> int:
        rows = sum(c.rows for c in self.counters)
        return rows // 2 if self.settings.guidance_scale != 1.0 else rows

    @property
    def num_steps(self) -> int:
        return self.settings.num_steps

    def predict(self, x: Tensor, j: int, rows: Tensor) -> Tensor:
        """The guided model output at ``x`` (rows of images ``rows``) at grid point ``t_j``."""
        outs = []
        for a in range(0, x.shape[0], self.max_batch):
            sl = slice(a, a + self.max_batch)
            idx = rows[sl]
            cond = cond_index(self.cond, idx)
            uncond = cond_index(self.uncond, idx) if self.uncond is not None else None
            xs = x[sl]
            t = self.ts[j].to(device=xs.device, dtype=torch.float32).expand(xs.shape[0])
            outs.append(guided_prediction(self.net, xs, t, cond, uncond, self.settings.guidance_scale))
        return torch.cat(outs)

    def step(self, x: Tensor, out: Tensor, j: int, noise: Tensor, *, deterministic: bool = False) -> Tensor:
        """``x_{t_j} -> x_{t_{j+1}}`` with the sampler (or its deterministic counterpart)."""
        fn = self.ode_fn if deterministic else self.step_fn
        eta = 0.0 if deterministic else self.settings.eta
        return fn(x, out, self.ts[j], self.ts[j + 1], eta=eta, noise=noise, schedule=self.schedule,
                  prediction_type=self.prediction_type).prev_sample

    def ode_step(self, x: Tensor, out: Tensor, t: Tensor, t_prev: Tensor) -> Tensor:
        """A deterministic step between two arbitrary times (lookahead rollouts)."""
        return self.ode_fn(x, out, t, t_prev, eta=0.0, noise=torch.zeros_like(x), schedule=self.schedule,
                           prediction_type=self.prediction_type).prev_sample

    def x0_hat(self, x: Tensor, out: Tensor, j: int | Tensor) -> Tensor:
        """The model's prediction of the clean sample, ``E[x_0 | x_t]`` (no extra evaluation)."""
        t = self.ts[j] if isinstance(j, int) else j
        alpha, sigma = self.schedule.alpha_sigma(t)
        return to_x0_eps(out, x, alpha, sigma, self.prediction_type)[0]

    def decode(self, x0: Tensor) -> Tensor:
        return self.model.decode(x0)

    def score(self, x0: Tensor, rows: Tensor) -> Tensor:
        """Reward of the decoded ``x0`` rows (no gradient), float32 on the CPU."""
        with torch.no_grad():
            images = self.decode(x0).float()
            self.reward_calls += images.shape[0]
            return self.reward(images, [self.prompts[int(i)] for i in rows]).detach().float().cpu()

    def init_noise(self, generators: Sequence[torch.Generator]) -> Tensor:
        return draw(generators, self.shape, self.device)

    def noise(self, generators: Sequence[torch.Generator]) -> Tensor:
        return draw(generators, self.shape, self.device)


def _device(model: Any) -> torch.device:
    net = getattr(model, "net", model)
    params = getattr(net, "parameters", None)
    if params is not None:
        try:
            return next(params()).device
        except StopIteration:
            pass
    return torch.device(getattr(model, "device", "cpu"))


def run_chains(engine: Engine, x: Tensor, rows: Tensor, generators: Sequence[torch.Generator],
               start: int = 0) -> Tensor:
    """Sample every row from grid point ``start`` to ``t = 0``, one noise draw per step from its
    generator (the draws ``core.sampling.sample`` makes). No gradient."""
    with torch.no_grad():
        for j in range(start, engine.num_steps):
            out = engine.predict(x, j, rows)
            x = engine.step(x, out, j, engine.noise(generators))
    return x


def finish(engine: Engine, method: str, budget: int, x0: Tensor, scores: Tensor, prompts: list[str],
           seeds: list[int], trace: dict) -> SearchResult:
    """Decode the chosen samples and assemble the result, checking the budget."""
    nfe = check_spent(method, engine.nfe, budget)
    with torch.no_grad():
        images = engine.decode(x0).float().cpu()
    trace = {"method": method, "sampler": engine.settings.sampler, "num_steps": engine.num_steps,
             "guidance_scale": engine.settings.guidance_scale, "eta": engine.settings.eta, "budget": budget,
             "nfe_per_image": nfe / len(prompts), "reward": reward_name(engine.reward),
             "reward_calls": engine.reward_calls, **trace}
    return SearchResult(images=images, scores=scores.detach().float().cpu(), nfe=nfe, trace=trace,
                        prompts=list(prompts), seeds=list(seeds))


def select_rows(scores: Tensor, k: int, *, alpha: float = 0.0, generators: Sequence[torch.Generator] | None = None
                ) -> Tensor:
    """Per image (rows of ``scores [N, C]``) pick ``k`` columns: the top ``k`` when ``alpha == 0``,
    else ``k`` draws without replacement from ``softmax(scores / alpha)`` (SVDD's selection)."""
    if alpha == 0:
        return torch.topk(scores, k, dim=1, sorted=True).indices
    out = []
    for i in range(scores.shape[0]):
        p = torch.softmax(scores[i].double() / alpha, dim=0)
        out.append(torch.multinomial(p, k, replacement=False, generator=generators[i]))
    return torch.stack(out)
