"""Shared plumbing of the CLIP-family rewards: local loading, differentiable preprocessing,
feature extraction across transformers 4.x / 5.x, and a text-embedding cache.

Nothing here downloads: every ``from_pretrained`` gets a local directory and
``local_files_only=True``; a missing or unreadable directory raises an error naming the path
and the files expected there.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_choice
from .base import Reward, require

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation (also HPS, PickScore, ImageReward)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_CLIP_FILES = "config.json + model.safetensors (or pytorch_model.bin) + tokenizer files (tokenizer.json, or vocab.json + merges.txt)"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_dir(path: Any, what: str, expected: str) -> Path:
    """``path`` as an existing directory, or ``FileNotFoundError`` naming it and what belongs there."""
    if path is None:
        raise ValueError(f"{what} needs path=DIR, a local directory holding {expected} (nothing is downloaded)")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: model directory {str(p)!r} does not exist; expected a directory with {expected}")
    return p


def find_file(directory: Path, candidates: Iterable[str], what: str, expected: str) -> Path:
    """The first of ``candidates`` present in ``directory`` (or ``FileNotFoundError``)."""
    candidates = list(candidates)
    for name in candidates:
        if (directory / name).is_file():
            return directory / name
    present = sorted(x.name for x in directory.iterdir())[:20]
    raise FileNotFoundError(f"{what}: {str(directory)!r} has none of {candidates}; expected {expected} "
                            f"(found: {present})")


def has_weights(directory: Path) -> bool:
    return any((directory / n).is_file() for n in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))


def load_torch_file(path: Path, what: str) -> dict:
    """``torch.load(weights_only=True)`` or a ``.safetensors`` file, with errors that name the file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint -> one clear error
        raise ValueError(f"{what}: cannot read checkpoint {str(path)!r} ({type(e).__name__}: {e}); "
                         f"is the file complete and a torch state dict?") from e


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars (loading / saving shards) inside the block."""
    from transformers.utils import logging as tf_logging

    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            tf_logging.enable_progress_bar()


def skip_init() -> Any:
    """Context manager that skips weight initialisation while building a model whose every
    weight is then loaded from a checkpoint (ViT-H: ~10 s instead of ~90 s on CPU)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5.x
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # 4.x
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def load_hf(loader: Any, directory: Path, what: str, expected: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(directory, local_files_only=True)`` with errors naming the directory."""
    try:
        with quiet_transformers():
            return loader.from_pretrained(str(directory), local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{what}: cannot load {getattr(loader, '__name__', loader)} from {str(directory)!r} "
                         f"({type(e).__name__}: {str(e)[:300]}); expected {expected}") from e


def embedding(out: Any) -> Tensor:
    """The embedding tensor from ``get_image_features`` / ``get_text_features``: transformers 4.x
    returns a tensor, 5.x a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds it."""
    if isinstance(out, Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        val = getattr(out, key, None)
        if isinstance(val, Tensor):
            return val
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot find the embedding in a {type(out).__name__}")


def preprocess(images: Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
               mode: str = "crop") -> Tensor:
    """Differentiable CLIP preprocessing of ``[B, 3, H, W]`` images in [0, 1].

    ``mode="crop"`` (CLIP/PickScore/ImageReward): resize the shorter side to ``size`` (bicubic,
    antialiased -- the PIL bicubic filter of the reference processors) and centre-crop;
    ``mode="pad"`` (HPSv2's ``ResizeMaxSize``): resize the longer side to ``size`` and pad with
    black. Then normalise with ``mean`` / ``std``.
    """
    check_choice("mode", mode, ("crop", "pad"))
    h, w = images.shape[-2:]
    x = images.float()
    scale = size / (min(h, w) if mode == "crop" else max(h, w))
    nh, nw = (size, size) if h == w else (max(1, round(h * scale)), max(1, round(w * scale)))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    if mode == "crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    else:
        ph, pw = size - nh, size - nw
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=0.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def image_settings(directory: Path, default_size: int) -> tuple[int, tuple, tuple]:
    """(size, mean, std) from ``preprocessor_config.json`` if present, else CLIP's defaults."""
    size, mean, std = default_size, CLIP_MEAN, CLIP_STD
    cfg_file = directory / "preprocessor_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        crop = cfg.get("crop_size", cfg.get("size"))
        if isinstance(crop, dict):
            crop = crop.get("height", crop.get("shortest_edge"))
        size = int(crop or size)
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return size, mean, std


class ClipReward(Reward):
    """Base of rewards built on a transformers ``CLIPModel``: frozen, eval mode, differentiable in
    the images; text embeddings are cached per prompt (up to ``cache_size``)."""

    differentiable = True
    cache_size = 4096
    preprocess_mode = "crop"

    def _setup(self, model: Any, tokenizer: Any, device: str | torch.device, dtype: str,
               size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        check_choice("dtype", dtype, DTYPES)
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=DTYPES[dtype])
        self.tokenizer = tokenizer
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        self.max_length = min(int(getattr(model.config.text_config, "max_position_embeddings", 77)), 77)
        self._text_cache: dict[str, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "ClipReward":
        self.model.to(device)
        self._text_cache.clear()
        return self

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}

    def encode_text(self, prompts: list[str], normalize: bool = True) -> Tensor:
        """Text embeddings ``[B, D]`` (L2-normalised by default), cached per prompt."""
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            with torch.no_grad():
                emb = embedding(self.model.get_text_features(**self.tokenize(missing))).float()
            if len(self._text_cache) + len(missing) > self.cache_size:
                self._text_cache.clear()
            self._text_cache.update(zip(missing, emb))
        emb = torch.stack([self._text_cache[p] for p in prompts])
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """Image embeddings ``[B, D]`` with the autograd graph back to ``images``."""
        x = preprocess(images.to(self.device), self.size, self.mean, self.std, self.preprocess_mode)
        emb = embedding(self.model.get_image_features(pixel_values=x.to(self.model.dtype))).float()
        return F.normalize(emb, dim=-1) if normalize else emb

    def cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        return (self.encode_image(images) * self.encode_text(prompts)).sum(-1)


def load_clip(directory: Path, what: str, tokenizer_path: Any = None) -> tuple[Any, Any]:
    """A transformers ``CLIPModel`` and its tokenizer from local directories."""
    transformers = require("transformers", what)
    if not (directory / "config.json").is_file() or not has_weights(directory):
        raise FileNotFoundError(f"{what}: {str(directory)!r} is not a CLIP model directory; expected {HF_CLIP_FILES}")
    model = load_hf(transformers.CLIPModel, directory, what, HF_CLIP_FILES)
    tok_dir = Path(tokenizer_path) if tokenizer_path is not None else directory
    tokenizer = load_tokenizer(tok_dir, what)
    return model, tokenizer


def load_tokenizer(directory: Path, what: str) -> Any:
    """A CLIP tokenizer from ``tokenizer.json`` or ``vocab.json`` + ``merges.txt`` in ``directory``."""
    transformers = require("transformers", what)
    expected = "tokenizer.json, or vocab.json + merges.txt (the CLIP BPE tokenizer files)"
    if not directory.is_dir():
        raise FileNotFoundError(f"{what}: tokenizer directory {str(directory)!r} does not exist; expected {expected}")
    if not ((directory / "tokenizer.json").is_file()
            or ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file())):
        raise FileNotFoundError(f"{what}: {str(directory)!r} has no tokenizer; expected {expected}")
    return load_hf(transformers.CLIPTokenizer, directory, what, expected)

