"""The shapes world: a procedural text-to-image world whose prompts are verified exactly.

It is the GenEval analogue of this project: prompts name counts, colours, shapes and spatial
relations of flat shapes on a white 32x32 canvas; :func:`render` draws a reference image and
:func:`verify` scores any image (reference or generated) against its prompt with a dense score.

Conventions: pixel ``(x, y)`` is column ``x``, row ``y`` (y grows downwards); a pixel's centre is
``(x + 0.5, y + 0.5)``; a ``bbox`` ``(x0, y0, x1, y1)`` is half-open (``x1 = x0 + width``); a
``center`` is the mean of the object's pixel centres (for a triangle it lies below the bbox centre).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

IMAGE_SIZE = 32
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (150, 60, 200),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNTS: dict[str, int] = {"one": 1, "two": 2, "three": 3, "four": 4}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_WORDS: tuple[str, ...] = tuple(dict.fromkeys(w for r in RELATIONS for w in r.split()))  # left, of, ...
# the relations that name the second-placed object first ("A right of B": B is the left one; see canonical())
SECOND_FIRST_WORDS: tuple[str, ...] = ("right", "below")
VOCAB: list[str] = sorted(
    {*COUNTS, *COLORS, *SHAPES, *(s + "s" for s in SHAPES), "a"} | {w for r in RELATIONS for w in r.split()}
)
SPLITS = ("train", "heldout", "all")
MIN_SIZE, MAX_SIZE = 6, 12
GAP = 2  # empty pixels between bboxes; 2 (not 1) so blurred neighbours never bridge the gap
RELATION_MARGIN = 2.0  # |d_axis| must exceed |d_other| by this many px (render AND verify)
_RENDER_SLACK = 1.0  # renders keep 1 px more than the verifier needs, so noise cannot flip them
# Detection thresholds (measured on corrupted renders, see tests/test_shapes_world.py):
FG_THRESHOLD = 80.0  # max channel distance to 255; 80 ~ 37-41% of the way from white to any
#   palette colour, so tinted backgrounds/noise (<~45) and 50%-blurred outer edges (<~65) stay white
MAX_COLOR_DIST = 70.0  # RGB distance to the white->colour ramp; palette ramps are >=114 apart
MIN_PIXELS = 8  # smaller components are stray pixels / noise
MAX_ASPECT = 1.4  # max(w/h, h/w) of a shape's bbox
FILL_TOL = 0.12  # |fill - expected| allowed (circle/square fills are >=0.11 apart; triangles go by skew)
_WHITE = np.float32(255.0)
_RAMPS = _WHITE - np.array(list(PALETTE.values()), np.float32)  # (5, 3) white->colour directions
_COUNT_WORD = {v: k for k, v in COUNTS.items()}
_HELP = ("expected '<one|two|three|four> <color> <shape>[s]' or "
         "'a <color> <shape> <left of|right of|above|below> a <color> <shape>'")


@dataclass(frozen=True)
class ParsedPrompt:
    """A parsed prompt: ``kind`` is "count" (``count, color, shape``) or "relation" (``a, relation, b``)."""

    kind: str
    count: int | None = None
    color: str | None = None
    shape: str | None = None
    a: tuple[str, str] | None = None
    relation: str | None = None
    b: tuple[str, str] | None = None


def parse(prompt: str) -> ParsedPrompt:
    """Parse a prompt with the strict grammar; raise ``ValueError`` naming the offending word/prompt."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    words = prompt.split()
    for w in words:
        if w not in VOCAB:
            raise ValueError(f"unknown word {w!r} in prompt {prompt!r}; known words: {', '.join(VOCAB)}")
    if len(words) == 3 and words[0] in COUNTS and words[1] in COLORS:
        n, shape = COUNTS[words[0]], words[2]
        base = shape[:-1] if shape.endswith("s") and shape[:-1] in SHAPES else shape
        if base in SHAPES:
            want = base if n == 1 else base + "s"
            if shape != want:
                raise ValueError(f"wrong plurality in prompt {prompt!r}: {words[0]!r} needs {want!r}, got {shape!r}")
            return ParsedPrompt("count", count=n, color=words[1], shape=base)
    rel = " ".join(words[3:-3])
    if (len(words) in (7, 8) and rel in RELATIONS and words[0] == words[-3] == "a"
            and words[1] in COLORS and words[-2] in COLORS and words[2] in SHAPES and words[-1] in SHAPES):
        a, b = (words[1], words[2]), (words[-2], words[-1])
        if a == b:
            raise ValueError(f"relation prompt {prompt!r} names the same object twice; they must differ")
        return ParsedPrompt("relation", a=a, relation=rel, b=b)
    raise ValueError(f"malformed prompt {prompt!r}: {_HELP}")


_MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def swapped(prompt: str) -> str:
    """``"a A rel a B"`` -> ``"a B rel a A"``: the same words with the objects' roles exchanged (a
    different scene: the hard negative of an order-blind reading)."""
    p = parse(prompt)
    if p.kind != "relation":
        raise ValueError(f"swapped() needs a relation prompt, got {prompt!r}")
    return f"a {p.b[0]} {p.b[1]} {p.relation} a {p.a[0]} {p.a[1]}"


def canonical(prompt: str) -> str:
    """One name per scene: ``"a A right of a B"`` and ``"a B left of a A"`` describe the same images
    (the renderer's and verifier's relations are exact mirror images), so both map to the ``left of``
    / ``above`` form; count prompts are their own canonical form."""
    p = parse(prompt)
    if p.kind == "relation" and p.relation in ("right of", "below"):
        return f"a {p.b[0]} {p.b[1]} {_MIRROR[p.relation]} a {p.a[0]} {p.a[1]}"
    return prompt


def is_prompt(prompt: str) -> bool:
    """True iff ``prompt`` parses in the shapes world's grammar."""
    try:
        parse(prompt)
        return True
    except ValueError:
        return False


def _count_prompt(n: int, color: str, shape: str) -> str:
    return f"{_COUNT_WORD[n]} {color} {shape}{'s' if n > 1 else ''}"


@functools.lru_cache(maxsize=None)
def _all(kind: str | None) -> tuple[str, ...]:
    count = [_count_prompt(n, c, s) for n in COUNTS.values() for c in COLORS for s in SHAPES]
    objs = [(c, s) for c in COLORS for s in SHAPES]
    rel = [f"a {a[0]} {a[1]} {r} a {b[0]} {b[1]}" for a in objs for r in RELATIONS for b in objs if a != b]
    if kind not in (None, "count", "relation"):
        raise ValueError(f"kind must be None, 'count' or 'relation', got {kind!r}")
    return tuple({"count": count, "relation": rel}.get(kind, count + rel))  # type: ignore[arg-type]


def all_prompts(kind: str | None = None) -> list[str]:
    """Every prompt of the world (60 count + 840 relation prompts) in a fixed order; ``kind`` filters."""
    return list(_all(kind))


def split_of(prompt: str) -> str:
    """Return "train" or "heldout" for a prompt, by a fixed arithmetic rule (no randomness).

    With colour index ``c`` (red=0 .. purple=4 in ``COLORS``) and shape index ``s`` (circle=0,
    square=1, triangle=2):

    * count prompt ``"k C S"``: held out iff ``(c + s + k - 1) % 5 == 0`` -- a Latin-square-like
      diagonal that holds out 12 of the 60 prompts (20%), at most one count per (C, S) pair, and
      at most 3 of the 12 prompts of any colour/shape/count, so all of them still appear in train.
    * relation prompt: the unordered object pair ``{(cA, sA), (cB, sB)}`` is held out iff
      ``(cA + sA + cB + sB) % 5 == 0`` -- 21 of the 105 pairs (20%), held out in every relation
      and in both orders (168 of the 840 relation prompts); every object still appears in train.
    """
    p = parse(prompt)
    ci, si = {c: i for i, c in enumerate(COLORS)}, {s: i for i, s in enumerate(SHAPES)}
    if p.kind == "count":
        key = ci[p.color] + si[p.shape] + p.count - 1  # type: ignore[index,operator]
    else:
        key = ci[p.a[0]] + si[p.a[1]] + ci[p.b[0]] + si[p.b[1]]  # type: ignore[index]
    return "heldout" if key % 5 == 0 else "train"


@functools.lru_cache(maxsize=None)
def _pool(split: str, kind: str, count: int | None = None) -> tuple[str, ...]:
    return tuple(p for p in _all(kind) if (split == "all" or split_of(p) == split)
                 and (count is None or parse(p).count == count))


def sample_prompts(n: int, split: str = "train", seed: int = 0, kinds: Sequence[str] = ("count", "relation"),
                   relation_fraction: float = 0.5) -> list[str]:
    """Draw ``n`` prompts with replacement from ``split`` ("train", "heldout" or "all"), deterministically.

    ``round(n * relation_fraction)`` are relation prompts (uniform over the split's relation
    prompts); the rest are count prompts whose count is uniform over one..four. The fraction is
    forced to 0/1 when ``kinds`` holds only "count"/"relation". The order is shuffled.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or any(k not in ("count", "relation") for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of ('count', 'relation'), got {kinds!r}")
    if not 0.0 <= relation_fraction <= 1.0:
        raise ValueError(f"relation_fraction must be in [0, 1], got {relation_fraction!r}")
    frac = relation_fraction if len(set(kinds)) == 2 else float(kinds[0] == "relation")
    rng = np.random.default_rng(seed)
    n_rel = int(round(n * frac))
    rel = _pool(split, "relation")
    out = [rel[i] for i in rng.integers(len(rel), size=n_rel)]
    for k in rng.integers(1, 5, size=n - n_rel):
        pool = _pool(split, "count", int(k))
        out.append(pool[rng.integers(len(pool))])
    return [out[i] for i in rng.permutation(n)]


# ----------------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Exact boolean ``(size, size)`` mask of a shape filling its bbox (read-only, cached)."""
    c = np.arange(size) + 0.5  # pixel centres
    if shape == "square":
        m = np.ones((size, size), bool)
    elif shape == "circle":  # pixel centres within the radius of the centre
        r = size / 2
        m = (c[:, None] - r) ** 2 + (c[None, :] - r) ** 2 <= r * r
    elif shape == "triangle":  # row r spans half-width (r+1)/h * w/2: apex row never empty
        m = np.abs(c[None, :] - size / 2) <= (np.arange(size)[:, None] + 1) * 0.5
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    m.flags.writeable = False
    return m


def relation_holds(ca: Sequence[float], cb: Sequence[float], relation: str, margin: float = RELATION_MARGIN) -> bool:
    """True iff centre ``ca`` is ``relation`` of ``cb``: the displacement along the relation's axis has
    the right sign and exceeds the displacement along the other axis by at least ``margin`` px."""
    dx, dy = ca[0] - cb[0], ca[1] - cb[1]
    along, other = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return bool(along > 0 and along >= abs(other) + margin)


def _object(color: str, shape: str, x0: int, y0: int, size: int) -> dict[str, Any]:
    ys, xs = np.nonzero(shape_mask(shape, size))
    center = (float(x0 + xs.mean() + 0.5), float(y0 + ys.mean() + 0.5))
    return {"color": color, "shape": shape, "bbox": (x0, y0, x0 + size, y0 + size), "center": center, "size": size}


def _apart(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def draw(layout: Sequence[dict[str, Any]]) -> np.ndarray:
    """Rasterise a layout (list of object dicts with color/shape/bbox) onto a white uint8 image."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8)
    for o in layout:
        x0, y0, x1, y1 = o["bbox"]
        img[y0:y1, x0:x1][shape_mask(o["shape"], x1 - x0)] = PALETTE[o["color"]]
    return img


def render(prompt: str, rng: np.random.Generator, max_tries: int = 10_000) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Render a reference image for ``prompt``: ``(uint8 (32, 32, 3) image, layout)``.

    Sizes (6..12 px) and positions are drawn by rejection sampling until the objects are
    ``GAP`` px apart (and, for relations, satisfy the relation with 1 px to spare).
    """
    p = parse(prompt)
    objs = [(p.color, p.shape)] * p.count if p.kind == "count" else [p.a, p.b]  # type: ignore[operator,list-item]
    for _ in range(max_tries):
        layout: list[dict[str, Any]] = []
        for color, shape in objs:
            size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            x0, y0 = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
            o = _object(color, shape, x0, y0, size)  # type: ignore[arg-type]
            if not all(_apart(o["bbox"], q["bbox"]) for q in layout):
                break  # restart the whole layout: cheap, and keeps sizes unbiased by crowding
            layout.append(o)
        else:
            if p.kind == "count" or relation_holds(layout[0]["center"], layout[1]["center"], p.relation,
                                                   RELATION_MARGIN + _RENDER_SLACK):  # type: ignore[arg-type]
                return draw(layout), layout
    raise RuntimeError(f"could not place the objects of {prompt!r} after {max_tries} tries")


def render_batch(prompts: Sequence[str], seed: int = 0) -> tuple[np.ndarray, list[list[dict[str, Any]]]]:
    """Render many prompts: ``(uint8 [N, 32, 32, 3], layouts)``; item ``i`` uses its own child seed,
    so it does not depend on the other prompts."""
    if isinstance(prompts, str):
        prompts = [prompts]
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(prompts))]
    out = [render(p, r) for p, r in zip(prompts, rngs)]
    images = np.stack([o[0] for o in out]) if out else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return images, [o[1] for o in out]


# -------------------------------------------------------------------------------- verification
@dataclass
class VerifyResult:
    """Per-image scores: ``score`` (N,) in [0, 1] (1 iff ``correct``), per-criterion scores, detections."""

    score: np.ndarray
    correct: np.ndarray
    criteria: dict[str, np.ndarray] = field(default_factory=dict)
    objects: list[list[dict[str, Any]]] = field(default_factory=list)


def _features(comp: np.ndarray) -> tuple[float, float, float, float]:
    """(size, aspect, fill, skew) of a component crop. An outermost row/column holding at most
    max(1, 1/3 of its inner neighbour's) pixels is trimmed first, so stray pixels touching a shape
    do not inflate its bbox (the expected-value table goes through the same trimming)."""

    def trim(c: np.ndarray) -> tuple[int, int]:
        if len(c) <= 2:
            return 0, len(c)
        return int(c[0] <= max(1, c[1] / 3)), len(c) - int(c[-1] <= max(1, c[-2] / 3))

    (r0, r1), (c0, c1) = trim(comp.sum(1)), trim(comp.sum(0))
    m = comp[r0:r1, c0:c1]
    h, w = m.shape
    ys = np.nonzero(m)[0]
    skew = (ys.mean() + 0.5) / h - 0.5 if len(ys) else 0.0  # > 0: bottom-heavy (upward triangle)
    return (w + h) / 2, max(w / h, h / w), float(m.mean()), float(skew)


# Expected fill/skew per shape as a function of measured size, from the renderer's own masks.
_TABLE = {s: np.array([_features(shape_mask(s, n)) for n in range(4, 25)]) for s in SHAPES}


def _classify(size: float, aspect: float, fill: float, skew: float) -> str:
    """Shape from bbox features. Skew (bottom-heaviness) separates triangles from the symmetric
    shapes with a wide margin; fill then separates circle from square. Expected values are
    interpolated at the measured size, because small discs are far from pi/4 (0.76..0.89)."""
    if aspect > MAX_ASPECT:
        return "unknown"
    exp = {s: (np.interp(size, t[:, 0], t[:, 2]), np.interp(size, t[:, 0], t[:, 3])) for s, t in _TABLE.items()}
    if skew >= exp["triangle"][1] / 2:
        best = "triangle"
    else:
        best = min(("circle", "square"), key=lambda s: abs(fill - exp[s][0]))
    return best if abs(fill - exp[best][0]) <= FILL_TOL else "unknown"


def _to_float_nhwc(images: Any) -> np.ndarray:
    """Accept uint8/float NHWC numpy or NCHW torch (also a single image); return float32 NHWC 0..255."""
    is_torch = type(images).__module__.split(".")[0] == "torch"
    arr = images.detach().cpu().numpy() if is_torch else np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"images must be [N,H,W,3] (numpy) or [N,3,H,W] (torch), got shape {tuple(arr.shape)}")
    if (is_torch and arr.shape[1] == 3) or (not is_torch and arr.shape[-1] != 3 and arr.shape[1] == 3):
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"expected {IMAGE_SIZE}x{IMAGE_SIZE} RGB images, got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"images must be uint8 in [0,255] or float in [0,1], got dtype {arr.dtype}")
    if not np.isfinite(arr).all() or arr.min(initial=0) < -1e-3 or arr.max(initial=0) > 1 + 1e-3:
        raise ValueError("float images must be finite and in [0, 1] (map [-1, 1] outputs with (x + 1) / 2)")
    return np.clip(arr.astype(np.float32), 0, 1) * 255


def detect(images: Any) -> list[list[dict[str, Any]]]:
    """Detect objects: ``{color, shape, bbox, center, pixels, fill}`` per component, per image."""
    x = _to_float_nhwc(images)
    d = _WHITE - x  # displacement from white
    fg = d.max(-1) > FG_THRESHOLD
    # distance to each white->colour ramp (not to the colour itself), so background-blended edge
    # pixels and pale/dark variants keep their hue; alpha clipped to allow slightly darker colours
    alpha = np.clip(np.einsum("nhwc,kc->nhwk", d, _RAMPS) / (_RAMPS**2).sum(1), 0, 1.3)
    dist = np.linalg.norm(d[..., None, :] - alpha[..., None] * _RAMPS, axis=-1)
    cmap = np.where(dist.min(-1) <= MAX_COLOR_DIST, dist.argmin(-1), len(COLORS))
    # 3x3 majority vote among foreground labels (own label wins ties): off-colour pixels inside
    # or on the edge of a shape (noise, stray pixels) take the shape's colour instead of punching
    # holes in it; the foreground/background decision itself is left unchanged
    onehot = (cmap[..., None] == np.arange(len(COLORS) + 1)) & fg[..., None]
    votes = ndimage.uniform_filter(onehot.astype(np.float32), size=(1, 3, 3, 1), mode="constant")
    cmap = np.where(fg, (votes + 0.05 * onehot).argmax(-1), -1)
    names = (*COLORS, "unknown")
    eight = np.ones((3, 3), bool)
    out: list[list[dict[str, Any]]] = []
    for cm in cmap:
        objs = []
        for k in np.unique(cm[cm >= 0]):
            lab, _ = ndimage.label(cm == k, structure=eight)
            for i, sl in enumerate(ndimage.find_objects(lab), start=1):
                comp = lab[sl] == i
                npx = int(comp.sum())
                if npx < MIN_PIXELS:
                    continue
                ys, xs = np.nonzero(comp)
                size, aspect, fill, skew = _features(comp)
                objs.append({
                    "color": names[k], "shape": _classify(size, aspect, fill, skew),
                    "bbox": (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop),
                    "center": (float(sl[1].start + xs.mean() + 0.5), float(sl[0].start + ys.mean() + 0.5)),
                    "pixels": npx, "fill": fill,
                })
        out.append(objs)
    return out


def _score_one(p: ParsedPrompt, objs: list[dict[str, Any]]) -> tuple[dict[str, float], bool]:
    n = len(objs)
    if p.kind == "count":
        m = sum(o["color"] == p.color and o["shape"] == p.shape for o in objs)
        crit = {"count": max(0.0, 1 - abs(m - p.count) / p.count),  # type: ignore[operator]
                "color": sum(o["color"] == p.color for o in objs) / n if n else 0.0,
                "shape": sum(o["shape"] == p.shape for o in objs) / n if n else 0.0,
                "relation": float("nan")}
        return crit, m == p.count and m == n
    a_objs = [o for o in objs if (o["color"], o["shape"]) == p.a]
    b_objs = [o for o in objs if (o["color"], o["shape"]) == p.b]
    na, nb = len(a_objs), len(b_objs)
    extras = max(na - 1, 0) + max(nb - 1, 0) + (n - na - nb)
    rel = any(relation_holds(a["center"], b["center"], str(p.relation)) for a in a_objs for b in b_objs)
    crit = {"count": (min(na, 1) + min(nb, 1)) / 2 / (1 + extras),  # 0.5 for both present + 1 extra
            "color": sum(o["color"] in (p.a[0], p.b[0]) for o in objs) / n if n else 0.0,  # type: ignore[index]
            "shape": sum(o["shape"] in (p.a[1], p.b[1]) for o in objs) / n if n else 0.0,  # type: ignore[index]
            "relation": float(rel)}
    return crit, na == 1 and nb == 1 and extras == 0 and rel


def verify(images: Any, prompts: Sequence[str] | str) -> VerifyResult:
    """Score images against prompts with dense partial credit (used as an RL reward).

    Criteria, each in [0, 1], over the detected objects (``m`` = objects matching the prompt):

    * count prompt ``"k C S"``: ``count = max(0, 1 - |m - k| / k)``; ``color``/``shape`` = fraction
      of detected objects of colour C / shape S (0 if none); ``relation`` = NaN.
    * relation prompt ``"a A rel a B"``: ``count = (both present ? 1 : one ? 0.5 : 0) / (1 + extras)``
      (extras = surplus copies of A/B plus any other object); ``color``/``shape`` = fraction of
      objects whose colour/shape is A's or B's; ``relation`` = 1 iff some (A, B) pair satisfies
      :func:`relation_holds`, else 0.

    ``images``: uint8 NHWC numpy (0..255), float NHWC numpy in [0, 1], or an NCHW torch tensor
    (float in [0, 1] or uint8); a single image without the batch axis is accepted too.
    ``score`` is the mean of the applicable criteria (count, color, shape [, relation]), so it
    is exactly 1 iff the image is correct.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    parsed = [parse(p) for p in prompts]
    objects = detect(images)
    if len(objects) != len(prompts):
        raise ValueError(f"got {len(objects)} images but {len(prompts)} prompts")
    keys = ("count", "color", "shape", "relation")
    crit = {k: np.zeros(len(prompts)) for k in keys}
    correct = np.zeros(len(prompts), bool)
    for i, (p, objs) in enumerate(zip(parsed, objects)):
        c, correct[i] = _score_one(p, objs)
        for k in keys:
            crit[k][i] = c[k]
    score = np.nanmean(np.stack([crit[k] for k in keys]), axis=0) if prompts else np.zeros(0)
    return VerifyResult(score=score, correct=correct, criteria=crit, objects=objects)


# the metrics over verify's results live in shapes_metrics; these names stay importable from here
from .shapes_metrics import accuracy_by_category, breakdown  # noqa: E402,F401
