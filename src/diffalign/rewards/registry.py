"""Name -> factory registry of rewards.

Built-in factories are named by ``"module:attribute"`` strings and imported only when asked for,
so ``import diffalign.rewards`` stays light: transformers, fastapi, httpx, ... are imported inside
the factories that need them, and a missing one raises ``ImportError`` naming the extra
(``pip install diffalign[rewards]``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Sequence

from .base import Reward

_BUILTIN: dict[str, tuple[str, str]] = {
    # name: (module relative to diffalign.rewards, factory), description
    "shapes": ("shapes:ShapesReward", "shapes-world verifier score in [0, 1] (exact, non-differentiable)"),
    "shapes_correct": ("shapes:ShapesCorrectReward", "1.0 iff the shapes verifier says the image is exactly correct"),
    "shapes_soft": ("shapes_soft:ShapesSoftReward", "smooth differentiable surrogate of the shapes verifier"),
    "brightness": ("stats:Brightness", "mean luma (BT.601), differentiable"),
    "saturation": ("stats:Saturation", "mean HSV saturation, differentiable"),
    "colorfulness": ("stats:Colorfulness", "Hasler-Suesstrunk colourfulness, differentiable"),
    "jpeg_compressibility": ("stats:JpegCompressibility", "minus the JPEG size (kB, quality 95)"),
    "jpeg_incompressibility": ("stats:JpegIncompressibility", "the JPEG size (kB, quality 95)"),
    "clipscore": ("clip_models:CLIPScore", "CLIPScore (Hessel et al. 2021) from a local CLIP directory"),
    "pickscore": ("clip_models:PickScore", "PickScore (Kirstain et al. 2023) from a local directory"),
    "aesthetic": ("clip_models:AestheticScore", "LAION aesthetic predictor v2 (CLIP ViT-L/14 + MLP head)"),
    "hpsv2": ("hps:HPSv2", "Human Preference Score v2/v2.1 (Wu et al. 2023), open_clip checkpoint"),
    "imagereward": ("imagereward:ImageReward", "ImageReward (Xu et al. 2023), BLIP + MLP head"),
    "geneval": ("geneval:GenEvalReward", "GenEval (Ghosh et al. 2023) on Mask2Former + CLIP; Flow-GRPO's partial credit"),
    "ocr": ("ocr:OCRReward", "text rendering: 1 - normalised edit distance to the quoted text (RapidOCR, Flow-GRPO)"),
    "vlm_judge": ("vlm_judge:VLMJudge", "P(yes) of a VLM judge over an OpenAI-compatible chat API"),
    "group_rank": ("group:GroupRank", "rank of a base reward within the group of one prompt, in [0, 1]"),
    "group_winrate": ("group:GroupWinRate", "win rate against the group (Bradley-Terry probabilities of a base reward)"),
    "learned": ("learned:LearnedReward", "a Bradley-Terry reward model trained by `diffalign train-reward`"),
    "remote": ("remote:RemoteReward", "a reward served over HTTP by `diffalign serve-reward`"),
    "temporal_consistency": ("video:TemporalConsistency", "mean CLIP cosine of consecutive video frames (1 = still)"),
    "motion_magnitude": ("video:MotionMagnitude", "mean absolute difference of consecutive video frames"),
    "source_clip": ("video:SourceClip", "CLIP image cosine to the prompt's conditioning image (editing, I2V)"),
    "source_l2": ("video:SourceL2", "minus the mean squared pixel distance to the conditioning image"),
}
_FACTORIES: dict[str, Callable[..., Reward] | str] = {k: v[0] for k, v in _BUILTIN.items()}
_DESCRIPTIONS: dict[str, str] = {k: v[1] for k, v in _BUILTIN.items()}


def register(name: str, factory: Callable[..., Reward] | str, description: str = "", *, overwrite: bool = False) -> None:
    """Add a reward factory (a callable, or ``"package.module:attr"``) under ``name``."""
    if not isinstance(name, str) or not name or "," in name or name != name.strip():
        raise ValueError(f"reward name must be a non-empty string without commas or outer spaces, got {name!r}")
    if name in _FACTORIES and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    _FACTORIES[name] = factory
    _DESCRIPTIONS[name] = description


def names() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_FACTORIES)


def describe() -> dict[str, str]:
    """``{name: one-line description}`` of every registered reward."""
    return {n: _DESCRIPTIONS.get(n, "") for n in names()}


def _resolve(name: str) -> Callable[..., Reward]:
    target = _FACTORIES[name]
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    if "." not in module:
        module = f"{__package__}.{module}"
    return getattr(importlib.import_module(module), attr)


def get(name: str, **kwargs: Any) -> Reward:
    """Build the reward registered as ``name`` with ``kwargs`` (e.g. ``get("clipscore", path=DIR)``).
    ``frames`` (any reward): how an image reward scores videos -- ``"mean"``, ``"min"`` or a frame index."""
    if not isinstance(name, str) or name.strip() not in _FACTORIES:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(names())}")
    name = name.strip()
    if "frames" in kwargs:
        from .base import check_frames

        frames = check_frames(kwargs.pop("frames"))
        reward = get(name, **kwargs)
        if getattr(reward, "video", False):
            raise ValueError(f"reward {name!r} scores whole videos; frames={frames!r} applies to image rewards")
        reward.frames = frames
        return reward
    factory = _resolve(name)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(factory).parameters if p not in ("self", "args", "kwargs")]
        raise ValueError(f"reward {name!r}: bad arguments {sorted(kwargs)} ({e}); it accepts: {params}") from None
    except ValueError:  # builtins without a signature
        pass
    return factory(**kwargs)


def get_many(spec: str | Sequence[str], **kwargs: Any) -> list[Reward]:
    """Build several rewards from ``"shapes,brightness"`` or ``["shapes", "brightness"]``.

    ``kwargs`` maps a reward name to the keyword arguments of that reward, e.g.
    ``get_many("shapes,clipscore", clipscore={"path": DIR})``.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() if isinstance(s, str) else s for s in items]
    if not items or any(not isinstance(s, str) or not s for s in items):
        raise ValueError(f"reward spec must be a non-empty comma list of names like 'shapes,brightness', "
                         f"got {spec!r}; known rewards: {', '.join(names())}")
    unknown = [s for s in items if s not in _FACTORIES]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown} in {spec!r}; known rewards: {', '.join(names())}")
    extra = set(kwargs) - set(items)
    if extra:
        raise ValueError(f"keyword arguments given for rewards not in the spec: {sorted(extra)}")
    return [get(s, **dict(kwargs.get(s) or {})) for s in items]
