"""The reward contract and the one shared input check.

A reward is a callable ``reward(images, prompts, meta=None) -> Tensor[B]``:

* ``images``: float tensor ``[B, 3, H, W]`` with values in ``[0, 1]`` (``IMAGE_SLACK`` tolerance);
* ``prompts``: list of ``B`` strings; ``meta``: optional list of ``B`` dicts a reward may fill
  with per-image details (the shapes reward writes ``meta[i]["shapes"]``);
* returns float32 scores on the images' device; rewards with ``differentiable = True`` keep the
  autograd graph back to ``images``.

Videos ``[B, F, 3, H, W]`` are scored too: a reward with ``video = True`` (temporal consistency,
motion) reads the frames itself; any other reward scores every frame as an image and reduces by its
``frames`` option -- ``"mean"`` (default), ``"min"``, or the index of one frame (only that frame is
scored). ``rewards.get(name, frames=...)`` sets it.

Every reward validates its inputs with :func:`check_inputs`, so all of them fail the same way
(``ValueError`` naming what is wrong) on bad shapes, ranges or prompt counts.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

IMAGE_SLACK = 1e-4  # images may leave [0, 1] by this much (float round-off of decoders)
EXTRA_HINT = "pip install diffalign[rewards]"
FRAME_REDUCTIONS = ("mean", "min")


def check_frames(frames: Any) -> str | int:
    """A reward's ``frames`` option: ``"mean"``, ``"min"`` or a frame index (negative counts from the end)."""
    if isinstance(frames, bool) or not (frames in FRAME_REDUCTIONS or isinstance(frames, int)):
        raise ValueError(f"frames must be one of {list(FRAME_REDUCTIONS)} or a frame index (int), got {frames!r}")
    return frames


def check_inputs(images: Any, prompts: Any, meta: Any = None, *, name: str = "reward", video: bool = False) -> list[str]:
    """Validate a reward call; return ``prompts`` as a list. Raises ``ValueError`` naming the problem.
    ``video``: ``images`` are videos ``[B, F, 3, H, W]``."""
    shape = "[B, F, 3, H, W]" if video else "[B, 3, H, W]"
    if not isinstance(images, Tensor):
        raise ValueError(f"{name}: images must be a torch.Tensor {shape} in [0, 1], got {type(images).__name__}")
    if images.ndim != (5 if video else 4):
        raise ValueError(f"{name}: images must have {5 if video else 4} dims {shape}, got shape {tuple(images.shape)}")
    if images.shape[-3] != 3:
        raise ValueError(f"{name}: images must have 3 channels (RGB) {shape}, got shape {tuple(images.shape)}")
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
    video: bool | None = False  # True: ``score`` takes videos [B, F, 3, H, W] only; None: images or videos
    frames: str | int = "mean"  # an image reward on a video: mean / min over frames, or one frame's index

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: list[dict] | None = None) -> Tensor:
        is_video = isinstance(images, Tensor) and images.ndim == 5
        if is_video and self.video is False:
            return self._by_frame(images, prompts, meta)
        prompts = check_inputs(images, prompts, meta, name=self.name, video=is_video if self.video is None else self.video)
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        out = self.score(images, prompts, meta)
        out = torch.as_tensor(out).to(device=images.device, dtype=torch.float32).reshape(-1)
        if out.shape[0] != images.shape[0]:
            raise RuntimeError(f"{self.name}: returned {out.shape[0]} scores for {images.shape[0]} images")
        return out

    def _by_frame(self, videos: Tensor, prompts: Sequence[str], meta: list[dict] | None) -> Tensor:
        """An image reward on videos: every frame scored, reduced by ``frames`` (per-frame scores
        in ``meta[i]["frame_scores"]``), or the one frame ``frames`` names."""
        prompts = check_inputs(videos, prompts, meta, name=self.name, video=True)
        B, F = videos.shape[:2]
        how = check_frames(self.frames)
        if isinstance(how, int):
            if not -F <= how < F:
                raise ValueError(f"{self.name}: frames={how} is outside the videos' {F} frames")
            return self(videos[:, how], prompts, meta)
        scores = self(videos.flatten(0, 1), [p for p in prompts for _ in range(F)]).view(B, F)
        if meta is not None:
            for m, s in zip(meta, scores.detach().cpu().tolist()):
                m["frame_scores"] = s
        return scores.mean(1) if how == "mean" else scores.min(1).values

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
