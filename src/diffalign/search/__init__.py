"""Inference-time alignment: spend extra denoiser evaluations at sampling time to raise a reward,
with the model's weights fixed (see ``docs/search.md``).

Every method has the shape ``method(model, prompts, reward, *, budget, num_images_per_prompt=1,
sampler=None, num_steps=None, guidance_scale=None, eta=None, seed=0, **options) -> SearchResult``
(``rlg`` takes the fine-tuned model second). ``budget`` is the total NFE of the call; ``nfe`` in the
result is what was really spent (one per guided denoiser evaluation of one sample, CFG's two
branches counting as one; see :mod:`diffalign.search.base`)::

    from diffalign import search
    from diffalign.models import load_model
    model = load_model("shapes-flow")
    res = search.smc(model, ["two red circles"], "shapes", budget=80, num_particles=8)
    res.images, res.scores, res.nfe, res.trace["ess"]
    res = search.run("dts", model, ["two red circles"], "shapes", budget=80)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

from .base import SearchResult, Settings, candidate_generator, resolve_settings, stream_seed
from .beam import beam_search, code, lookahead_cost
from .best_of_n import best_of_n
from .io import save_result, verifier_scores
from .noise_opt import chi_nll, dno, dno_probability_regularizer, image_kl, mira, reno
from .rlg import RLGDenoiser, resolve_tuned, rlg
from .smc import ess, resample, smc
from .svdd import svdd
from .tree import tree_search

METHODS: dict[str, Callable[..., SearchResult]] = {
    "best_of_n": best_of_n,
    "smc": smc,
    "beam": beam_search,
    "code": code,
    "svdd": svdd,
    "dts": tree_search,
    "reno": reno,
    "dno": dno,
    "mira": mira,
    "rlg": rlg,
}
GRADIENT_METHODS = ("reno", "dno", "mira")
_COMMON = {"budget", "num_images_per_prompt", "sampler", "num_steps", "guidance_scale", "eta", "seed"}


def options(method: str) -> list[str]:
    """The method-specific keyword options of ``method`` (beyond the common sampling ones)."""
    fn = _get(method)
    skip = _COMMON | {"model", "tuned", "prompts", "reward"}
    return [p for p in inspect.signature(fn).parameters if p not in skip]


def _get(method: str) -> Callable[..., SearchResult]:
    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


def run(method: str, model: Any, prompts: Sequence[str], reward: Any, *, budget: int, tuned: Any = None,
        **kwargs: Any) -> SearchResult:
    """Run the method named ``method``; unknown options raise ``ValueError`` listing the accepted ones."""
    fn = _get(method)
    accepted = set(inspect.signature(fn).parameters)
    bad = sorted(set(kwargs) - accepted)
    if bad:
        raise ValueError(f"{method}: unknown option(s) {bad}; it accepts {sorted(_COMMON - {'budget'})} and "
                         f"{options(method)}")
    if method == "rlg":
        if tuned is None:
            raise ValueError("rlg needs a fine-tuned model (--tuned DIR)")
        return fn(model, tuned, prompts, reward, budget=budget, **kwargs)
    if tuned is not None:
        raise ValueError(f"--tuned is only used by rlg, not by {method}")
    return fn(model, prompts, reward, budget=budget, **kwargs)


__all__ = ["GRADIENT_METHODS", "METHODS", "RLGDenoiser", "SearchResult", "Settings", "beam_search", "best_of_n",
           "candidate_generator", "chi_nll", "code", "dno", "dno_probability_regularizer", "ess", "image_kl",
           "lookahead_cost", "mira", "options", "reno", "resample", "resolve_settings", "resolve_tuned", "rlg", "run",
           "save_result", "smc", "stream_seed", "svdd", "tree_search", "verifier_scores"]
