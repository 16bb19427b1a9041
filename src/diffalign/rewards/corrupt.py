"""Controlled corruptions of shapes-world layouts, for preference pairs and reward tests.

Each corruption edits a rendered layout (the object list returned by
:func:`diffalign.worlds.shapes.render`) so that the verifier's verdict changes in a known way:

* ``drop``: remove one object (wrong count / missing object);
* ``extra``: add one more object (a copy of a named object, placed in free space);
* ``recolor``: give one object another palette colour;
* ``reshape``: give one object another shape (same bounding box);
* ``flip``: mirror the whole layout along the relation's axis (relation prompts only), which
  reverses the relation while keeping every object correct.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..worlds import shapes as world

CORRUPTIONS = ("drop", "extra", "recolor", "reshape", "flip")


def _apart(a: Sequence[int], b: Sequence[int]) -> bool:
    g = world.GAP
    return a[2] + g <= b[0] or b[2] + g <= a[0] or a[3] + g <= b[1] or b[3] + g <= a[1]


def _obj(color: str, shape: str, x0: int, y0: int, size: int) -> dict[str, Any]:
    return {"color": color, "shape": shape, "bbox": (x0, y0, x0 + size, y0 + size)}


def corrupt(layout: list[dict[str, Any]], prompt: str, kind: str, rng: np.random.Generator) -> list[dict] | None:
    """A corrupted copy of ``layout`` (``None`` if ``kind`` does not apply, e.g. ``flip`` on a count prompt)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    p = world.parse(prompt)
    out = [dict(o) for o in layout]
    if kind == "drop":
        if not out:
            return None
        out.pop(int(rng.integers(len(out))))
        return out
    if kind in ("recolor", "reshape"):
        if not out:
            return None
        i = int(rng.integers(len(out)))
        key, pool = ("color", world.COLORS) if kind == "recolor" else ("shape", world.SHAPES)
        out[i][key] = str(rng.choice([v for v in pool if v != out[i][key]]))
        return out
    if kind == "flip":
        if p.kind != "relation":
            return None
        horizontal = p.relation in ("left of", "right of")
        for o in out:
            x0, y0, x1, y1 = o["bbox"]
            o["bbox"] = (world.IMAGE_SIZE - x1, y0, world.IMAGE_SIZE - x0, y1) if horizontal else \
                (x0, world.IMAGE_SIZE - y1, x1, world.IMAGE_SIZE - y0)
        return out
    # extra: a copy of a named object in free space
    color, shape = (p.color, p.shape) if p.kind == "count" else (p.a if rng.random() < 0.5 else p.b)  # type: ignore[misc]
    for _ in range(200):
        size = int(rng.integers(world.MIN_SIZE, world.MAX_SIZE + 1))
        x0, y0 = (int(v) for v in rng.integers(0, world.IMAGE_SIZE - size + 1, size=2))
        o = _obj(color, shape, x0, y0, size)  # type: ignore[arg-type]
        if all(_apart(o["bbox"], q["bbox"]) for q in out):
            return out + [o]
    return None


def corrupted_batch(prompts: Sequence[str], layouts: Sequence[list[dict]], kinds: Sequence[str],
                    seed: int = 0) -> tuple[np.ndarray, list[str], list[int]]:
    """Apply a random applicable corruption from ``kinds`` to each layout.

    Returns ``(uint8 [M, 32, 32, 3] images, the corruption used per image, index of the source
    layout)``; layouts where no corruption applied are skipped.
    """
    rng = np.random.default_rng(seed)
    images, used, index = [], [], []
    for i, (prompt, layout) in enumerate(zip(prompts, layouts)):
        for kind in rng.permutation(list(kinds)):
            new = corrupt(layout, prompt, str(kind), rng)
            if new is not None:
                images.append(world.draw(new))
                used.append(str(kind))
                index.append(i)
                break
    arr = np.stack(images) if images else np.zeros((0, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), np.uint8)
    return arr, used, index
