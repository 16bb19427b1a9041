"""The reward contract and the one shared input check.

A reward is a callable ``reward(images, prompts, meta=None) -> Tensor[B]``:

* ``images``: float tensor ``[B, 3, H, W]`` with values in ``[0, 1]`` (``IMAGE_SLACK`` tolerance);
* ``prompts``: list of ``B`` strings; ``meta``: optional list of ``B`` dicts a reward may fill
  with per-image details (the shapes reward writes ``meta[i]["shapes"]``);
* returns float32 scores on the images' device; rewards with ``differentiable = True`` keep the
  autograd graph back to ``images``.

Every reward validates its inputs with :func:`check_inputs`, so all of them fail the same way
(``ValueError`` naming what is wrong) on bad shapes, ranges or prompt counts.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

IMAGE_SLACK = 1e-4  # images may leave [0, 1] by this much (float round-off of decoders)
EXTRA_HINT = "pip install diffalign[rewards]"


def check_inputs(images: Any, prompts: Any, meta: Any = None, *, name: str = "reward") -> list[str]:
    """Validate a reward call; return ``prompts`` as a list. Raises ``ValueError`` naming the problem."""
    if not isinstance(images, Tensor):
        raise ValueError(f"{name}: images must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name}: images must have 4 dims [B, 3, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"{name}: images must have 3 channels (RGB) in dim 1 [B, 3, H, W], "
                         f"got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: images must be a float tensor in [0, 1], got dtype {images.dtype}")
    if images.numel():
        with torch.no_grad():
            lo, hi = float(images.min()), float(images.max())
        if not (lo >= -IMAGE_SLACK and hi <= 1 + IMAGE_SLACK):  # also catches NaN
            raise ValueError(f"{name}: image values must be in [0, 1] (slack {IMAGE_SLACK}), got range "
                             f"[{lo:.4g}, {hi:.4g}]; map [-1, 1] outputs with (x + 1) / 2")
    if isinstance(prompts, str):
        raise ValueError(f"{name}: prompts must be a list of strings, got a single str {prompts!r}")
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name}: prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{name}: got {images.shape[0]} images but {len(prompts)} prompts")
    if meta is not None:
        if not isinstance(meta, Sequence) or len(meta) != len(prompts) or not all(isinstance(m, dict) for m in meta):
            raise ValueError(f"{name}: meta must be None or a list of {len(prompts)} dicts")
    return list(prompts)


class Reward:
    """Base class: subclasses set ``name`` / ``differentiable`` and implement :meth:`score`.

    ``__call__`` validates, calls ``score(images, prompts, meta)`` and returns float32 ``[B]`` on the
    images' device. Subclasses holding ``torch.nn.Module`` s override :meth:`to`.
    """

    name: str = "reward"
    differentiable: bool = False

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: list[dict] | None = None) -> Tensor:
        prompts = check_inputs(images, prompts, meta, name=self.name)
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        out = self.score(images, prompts, meta)
        out = torch.as_tensor(out).to(device=images.device, dtype=torch.float32).reshape(-1)
        if out.shape[0] != images.shape[0]:
            raise RuntimeError(f"{self.name}: returned {out.shape[0]} scores for {images.shape[0]} images")
        return out

    def to(self, device: str | torch.device) -> "Reward":
        """Move the reward's weights (if any) to ``device``; returns ``self``."""
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} differentiable={self.differentiable}>"


def require(module: str, what: str) -> Any:
    """Import an optional dependency or raise ``ImportError`` naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the optional dependency {module.split('.')[0]!r} ({e}); "
                          f"install it with `{EXTRA_HINT}`") from e
