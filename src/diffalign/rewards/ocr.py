"""Text-rendering reward (Liu et al. 2025, "Flow-GRPO", its OCR task): read the image with an OCR
engine and score ``1 - d / |t|``, ``t`` the text quoted in the prompt and ``d`` the edit
distance between ``t`` and the text read (both lower-cased, spaces removed; ``d = 0`` when ``t``
occurs inside the text read; ``d`` capped at ``|t|`` so the reward stays in [0, 1]).

The engine is RapidOCR (``rapidocr_onnxruntime``: PP-OCRv4 detection and recognition as ONNX
models shipped inside the wheel, onnxruntime on CPU; nothing is downloaded). Flow-GRPO used
PaddleOCR, which needs the PaddlePaddle framework; both run PP-OCR models.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import check_range
from .base import Reward, require

# (open, close) quote pairs, tried in this order; the first pair found in the prompt wins.
# Straight double quotes first: Flow-GRPO's prompts use them (it takes prompt.split('"')[1]).
QUOTES = (('"', '"'), ("\u201c", "\u201d"), ("\u00ab", "\u00bb"), ("\u201e", "\u201c"), ("\u2018", "\u2019"),
          ("\u300c", "\u300d"))
# single straight quotes only where they cannot be an apostrophe: after a non-letter, before one
_SINGLE = re.compile(r"(?:^|(?<=[^\w]))'([^']+?)'(?=$|[^\w])")


def quoted_text(prompt: str) -> str:
    """The text a prompt asks to be rendered: the first quoted span, in straight or curly double
    quotes, guillemets, „low-high“ quotes, curly single quotes, corner brackets, or straight single
    quotes that are not apostrophes. ``ValueError`` when there is none (or it is empty)."""
    for open_q, close_q in QUOTES:
        start = prompt.find(open_q)
        if start >= 0:
            end = prompt.find(close_q, start + 1)
            if end > start:
                text = prompt[start + 1:end]
                if not text.strip():
                    raise ValueError(f"ocr: the quoted text in prompt {prompt!r} is empty")
                return text
    m = _SINGLE.search(prompt)
    if m:
        return m.group(1)
    raise ValueError(f"ocr: prompt {prompt!r} quotes no text to render; put the text in quotes, e.g. "
                     "'a sign that says \"OPEN\"' (straight or curly double quotes, guillemets, or single quotes)")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalise(text: str) -> str:
    return text.replace(" ", "").lower()


def ocr_score(read: str, target: str) -> float:
    """Flow-GRPO's OCR reward of the text ``read`` against the ``target``: ``1 - min(d, |t|) / |t|``
    on lower-cased, space-free strings, ``d = 0`` when ``t`` is a substring of what was read."""
    r, t = normalise(read), normalise(target)
    if not t:
        raise ValueError(f"ocr: target text {target!r} has no characters besides spaces")
    d = 0 if t in r else min(edit_distance(r, t), len(t))
    return 1.0 - d / len(t)


def rapidocr_engine(threads: int = 0, use_cls: bool = False) -> Callable[[np.ndarray], list[tuple[str, float]]]:
    """A RapidOCR reader: ``uint8 [H, W, 3] -> [(text, confidence)]`` in reading order."""
    mod = require("rapidocr_onnxruntime", "the ocr reward")
    kwargs = {"intra_op_num_threads": threads, "inter_op_num_threads": threads} if threads else {}
    engine = mod.RapidOCR(**kwargs)

    def read(image: np.ndarray) -> list[tuple[str, float]]:
        result, _ = engine(image, use_cls=use_cls)
        return [(str(r[1]), float(r[2])) for r in (result or [])]

    return read


class OCRReward(Reward):
    """``1 - normalised edit distance`` between the prompt's quoted text and the text RapidOCR
    reads (module docstring). ``threads``: onnxruntime threads per session (0: its default);
    ``use_cls``: run the 180-degree text-direction classifier (off, as in Flow-GRPO);
    ``engine``: any callable ``uint8 [H, W, 3] -> [(text, confidence)]`` instead of RapidOCR.
    With ``meta``, ``meta[i]["ocr"] = {"target", "read"}``."""

    name = "ocr"
    differentiable = False

    def __init__(self, threads: int = 0, use_cls: bool = False, engine: Any = None):
        check_range("threads", threads, 0, None, integer=True)
        self.engine = engine if engine is not None else rapidocr_engine(threads, bool(use_cls))

    def read(self, images: Tensor) -> list[str]:
        """The text read in each image, pieces joined in reading order."""
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        # pieces with confidence 0 are dropped, as Flow-GRPO does; RapidOCR already drops those below 0.5
        return ["".join(text for text, conf in self.engine(np.ascontiguousarray(a)) if conf > 0) for a in arr]

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        targets = [quoted_text(p) for p in prompts]  # before OCR: a prompt without quotes fails fast
        read = self.read(images)
        if meta is not None:
            for m, t, r in zip(meta, targets, read):
                m["ocr"] = {"target": t, "read": r}
        return torch.tensor([ocr_score(r, t) for r, t in zip(read, targets)], dtype=torch.float32)


def render_text(text: str, size: int = 512, font_size: int = 48, seed: int = 0,
                colors: Sequence[tuple[int, int, int]] | None = None) -> Tensor:
    """``[3, size, size]`` image in [0, 1] with ``text`` drawn by PIL (random position and colours
    from ``seed``, wrapped to fit) -- known content for tests and the throughput benchmark."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    bg, fg = colors if colors is not None else (tuple(int(v) for v in rng.integers(170, 256, 3)),
                                                tuple(int(v) for v in rng.integers(0, 90, 3)))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=font_size)
    words, lines = text.split(), [""]
    for w in words:  # greedy wrap at 85% of the width
        trial = f"{lines[-1]} {w}".strip()
        if lines[-1] and draw.textlength(trial, font=font) > 0.85 * size:
            lines.append(w)
        else:
            lines[-1] = trial
    height = len(lines) * font_size * 1.25
    y = float(rng.uniform(0.05, 0.95 - min(height / size, 0.9))) * size
    for line in lines:
        width = draw.textlength(line, font=font)
        x = float(rng.uniform(0.03, max(0.04, 0.97 - width / size))) * size
        draw.text((x, y), line, fill=fg, font=font)
        y += font_size * 1.25
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
