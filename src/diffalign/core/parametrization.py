"""Conversions between prediction types, and classifier-free guidance -- each written once.

With ``x_t = alpha * x0 + sigma * eps`` a network may predict:

- ``epsilon``: the noise ``eps`` (DDPM, Ho et al. 2020);
- ``sample``: the clean data ``x0``;
- ``v_prediction``: ``v = alpha * eps - sigma * x0`` (Salimans & Ho 2022, "Progressive Distillation");
- ``flow``: the rectified-flow velocity ``v = eps - x0`` (Liu et al. 2022; Lipman et al. 2022).

Every other module converts through :func:`to_x0_eps` / :func:`from_x0_eps`; the formulas below
hold for any ``(alpha, sigma)``, so a flow model can be sampled with DDIM and vice versa.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")

# Dividing by alpha at t = 1 (flow) or by sigma at t = 0 is undefined; clamping keeps the
# conversion finite where the quantity being recovered carries no information anyway.
_EPS = 1e-6


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def broadcast_to(v: float | Tensor, x: Tensor) -> Tensor:
    """Shape a scalar or per-sample ``[B]`` value as ``[B, 1, 1, ...]`` against ``x``."""
    v = torch.as_tensor(v, device=x.device)
    if v.ndim == 0:
        return v.to(x.dtype)
    if v.ndim == x.ndim and v.shape[0] in (1, x.shape[0]) and all(d == 1 for d in v.shape[1:]):
        return v.to(x.dtype)  # already shaped [B, 1, ...]
    if v.ndim != 1 or v.shape[0] != x.shape[0]:
        raise ValueError(f"expected a scalar or a [B={x.shape[0]}] tensor, got shape {tuple(v.shape)}")
    return v.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def to_x0_eps(model_output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """Any prediction -> ``(x0_hat, eps_hat)``. ``alpha``/``sigma`` broadcast against ``x_t``."""
    check_prediction_type(prediction_type)
    alpha, sigma = broadcast_to(alpha, x_t), broadcast_to(sigma, x_t)
    if prediction_type == "epsilon":
        eps = model_output
        return (x_t - sigma * eps) / alpha.clamp_min(_EPS), eps
    if prediction_type == "sample":
        x0 = model_output
        return x0, (x_t - alpha * x0) / sigma.clamp_min(_EPS)
    if prediction_type == "v_prediction":
        norm = alpha**2 + sigma**2  # 1 for VP schedules
        return (alpha * x_t - sigma * model_output) / norm, (sigma * x_t + alpha * model_output) / norm
    # flow: x_t = alpha x0 + sigma (v + x0)  =>  x0 = (x_t - sigma v) / (alpha + sigma)
    x0 = (x_t - sigma * model_output) / (alpha + sigma)
    return x0, model_output + x0


def from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """``(x0, eps)`` -> the requested prediction type."""
    check_prediction_type(prediction_type)
    alpha, sigma = broadcast_to(alpha, x0), broadcast_to(sigma, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    return eps - x0


def convert(model_output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, source: str, target: str) -> Tensor:
    """Re-express a prediction of type ``source`` as type ``target``."""
    if source == target:
        check_prediction_type(source)
        return model_output
    x0, eps = to_x0_eps(model_output, x_t, alpha, sigma, source)
    return from_x0_eps(x0, eps, alpha, sigma, target)


def cfg(cond_out: Tensor, uncond_out: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ``u + w (c - u)``.

    Applied to the raw prediction; every prediction type above is affine in ``(x0, eps)`` with
    coefficients shared by both branches, so guiding any of them is the same operation.
    """
    return uncond_out + guidance_scale * (cond_out - uncond_out)


# ----- conditioning containers -------------------------------------------------------------
# ``cond`` is whatever a model's ``encode_prompts`` returned: a tensor, or a tuple / dict /
# dataclass of tensors with the batch on dim 0. Algorithms never look inside; they batch it
# with these two functions.


def cond_map(fn: Callable[..., Tensor], *conds: Any) -> Any:
    """Apply ``fn`` leaf-wise to one or more conditioning structures of the same shape."""
    first = conds[0]
    if isinstance(first, Tensor):
        return fn(*conds)
    if first is None:
        return None
    if isinstance(first, (tuple, list)):
        return type(first)(cond_map(fn, *parts) for parts in zip(*conds))
    if isinstance(first, dict):
        return {k: cond_map(fn, *(c[k] for c in conds)) for k in first}
    if hasattr(first, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.replace(
            first, **{f.name: cond_map(fn, *(getattr(c, f.name) for c in conds)) for f in dataclasses.fields(first)}
        )
    return first  # non-tensor metadata (e.g. a string) is shared across the batch


def cond_cat(*conds: Any) -> Any:
    """Concatenate conditionings along the batch dimension. A container type that defines a
    ``cond_cat`` classmethod concatenates itself (e.g. padding token sequences of different
    lengths under a mask)."""
    own = getattr(type(conds[0]), "cond_cat", None)
    if own is not None:
        return own(conds)
    return cond_map(lambda *xs: torch.cat(xs, dim=0), *conds)


def cond_index(cond: Any, index: Tensor | slice) -> Any:
    """Select batch rows of a conditioning (``index`` a slice or a LongTensor)."""
    return cond_map(lambda x: x[index], cond)


def guidance_rule(model: Any) -> Callable[[Tensor, Tensor, float], Tensor]:
    """How ``model`` combines its conditional and unconditional predictions: its own
    ``combine_guidance(cond_out, uncond_out, w)`` when it defines one (Qwen-Image renormalises the
    guided prediction to the conditional one's norm), else :func:`cfg`. Wrappers that keep the
    model in ``.module`` (DDP, FSDP) are looked through; peft forwards attributes itself."""
    m = model
    while m is not None:
        rule = getattr(m, "combine_guidance", None)
        if rule is not None:
            return rule
        m = getattr(m, "module", None)
    return cfg


def guided_prediction(
    model: Callable[[Tensor, Tensor, Any], Tensor],
    x_t: Tensor,
    t: Tensor,
    cond: Any,
    uncond: Any = None,
    guidance_scale: float = 1.0,
    negative_model: Callable[[Tensor, Tensor, Any], Tensor] | None = None,
) -> Tensor:
    """One model evaluation with classifier-free guidance (both branches in one batch).

    ``negative_model``: a second denoiser that computes the unconditional branch instead of
    ``model`` (Diffusion-NPO, Wang et al. 2025: a model trained on reversed preferences, so that
    guidance pushes away from what people dislike); then the branches are two calls.
    """
    if guidance_scale == 1.0 or uncond is None:
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} needs an unconditional `uncond` (got None)")
        return model(x_t, t, cond)
    combine = guidance_rule(model)
    if negative_model is not None:
        return combine(model(x_t, t, cond), negative_model(x_t, t, uncond), guidance_scale)
    out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), cond_cat(cond, uncond))
    c, u = out.chunk(2)
    return combine(c, u, guidance_scale)
