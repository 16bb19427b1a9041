"""Image grids with row labels: the one helper evaluation and reports use to show samples."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (30, 30, 30)
GOOD, BAD = (30, 160, 60), (210, 40, 40)
GAP = 6  # pixels between tiles


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable default font
    except TypeError:  # pragma: no cover - old Pillow
        return ImageFont.load_default()


def make_grid(images: torch.Tensor, ncols: int, *, row_labels: Sequence[str] | None = None,
              col_labels: Sequence[str] | None = None, marks: Sequence[bool | None] | None = None,
              tile: int = 96, font_size: int = 13) -> Image.Image:
    """Lay out ``images`` ``[N, 3, H, W]`` in ``[0, 1]`` row-major, ``ncols`` per row.

    Each image is scaled (nearest neighbour, so small images stay crisp) to ``tile`` pixels
    on its longer side. ``row_labels`` (one per row, e.g. the prompt) are written in a left
    margin; ``col_labels`` (one per column, e.g. the seed index) above the columns. ``marks``
    (one per image) frames a tile green (``True``, e.g. verified correct), red (``False``) or
    not at all (``None``).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a tensor [N, 3, H, W], got {getattr(images, 'shape', type(images))}")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    n = images.shape[0]
    nrows = max(1, -(-n // ncols))
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"got {len(row_labels)} row labels for {nrows} rows")
    if col_labels is not None and len(col_labels) != ncols:
        raise ValueError(f"got {len(col_labels)} column labels for {ncols} columns")
    if marks is not None and len(marks) != n:
        raise ValueError(f"got {len(marks)} marks for {n} images")
    h, w = images.shape[-2:]
    scale = tile / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(s: str) -> int:
        return int(probe.textlength(s, font=font))

    left = (max(text_width(s) for s in row_labels) + 3 * GAP) if row_labels else GAP
    top = (font_size + 3 * GAP) if col_labels else GAP
    canvas = Image.new("RGB", (left + ncols * (tw + GAP), top + nrows * (th + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, ncols)
        img = Image.fromarray(np.ascontiguousarray(pixels[i])).resize((tw, th), Image.NEAREST)
        x, y = left + c * (tw + GAP), top + r * (th + GAP)
        canvas.paste(img, (x, y))
        if marks is not None and marks[i] is not None:
            draw.rectangle((x - 2, y - 2, x + tw + 1, y + th + 1), outline=GOOD if marks[i] else BAD, width=2)
    for r, label in enumerate(row_labels or []):
        draw.text((GAP, top + r * (th + GAP) + th // 2), str(label), fill=TEXT, font=font, anchor="lm")
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * (tw + GAP) + tw // 2, top // 2), str(label), fill=TEXT, font=font, anchor="mm")
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, ncols: int, **kwargs) -> Path:
    """:func:`make_grid` and save it as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, ncols, **kwargs).save(path, format="PNG")
    return path


def save_video_grid(videos: torch.Tensor, path: str | Path, ncols: int, fps: float, **kwargs) -> Path:
    """Videos ``[N, F, 3, H, W]`` as one animated grid (:func:`make_grid` per frame), written as MP4
    or animated WebP by ``path``'s suffix (``evaluation.video``)."""
    from .video import write_video

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.stack([np.asarray(make_grid(videos[:, f], ncols, **kwargs)) for f in range(videos.shape[1])])
    return write_video(frames, path, fps)


def save_frame_strips(videos: torch.Tensor, path: str | Path, n: int = 8, **kwargs) -> Path:
    """One row per video of ``n`` evenly spaced frames (a PNG), labelled with the frame numbers."""
    F_ = videos.shape[1]
    idx = sorted(set(np.linspace(0, F_ - 1, min(n, F_)).round().astype(int).tolist()))
    return save_grid(videos[:, idx].flatten(0, 1), path, len(idx), col_labels=[f"frame {i}" for i in idx], **kwargs)
