"""GenEval agreement on images with known content -- what can be checked without the real weights.

For each of GenEval's 553 prompts, a scene is drawn with PIL that meets the prompt (the required
objects as filled ellipses in the required colours, in the required relation), plus corrupted
versions that must fail (an object dropped, recoloured, an extra object on a counting prompt,
the two objects of a position prompt swapped) or still pass (an extra object below the counting
threshold, an unrelated object). The rules then score the scene from detections read off the
drawing -- each object's mask, its box the mask's extent, score 0.95 -- with a nearest-colour
classifier on the masked pixels standing in for CLIP.

What this measures: the rule layer (thresholds, counting, the 0.1 relative position margin,
colour attribution, GenEval's include/exclude logic) and the mask -> box path on rendered
images. What it cannot measure here: Mask2Former's detections and CLIP's colour names on real
images, which need the published weights (not downloadable in this environment); with random
weights the detector finds nothing.

Run: ``python benchmarks/geneval_agreement.py [--size 128] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np

from diffalign.data import prompt_sets
from diffalign.rewards.geneval_rules import COLORS, Detection, judge

PALETTE = {"red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 60),
           "blue": (40, 80, 220), "purple": (140, 50, 200), "pink": (245, 150, 200), "brown": (130, 80, 40),
           "black": (20, 20, 20), "white": (250, 250, 250)}
BACKGROUND = (90, 150, 150)
GRID = 4  # objects sit in the cells of a 4 x 4 grid: never overlapping
STEP = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}


def scene(meta: dict, rng: np.random.Generator) -> list[dict]:
    """Objects ``{class, color, cell, score}`` that meet the prompt's metadata."""
    objs: list[dict] = []
    free = [(r, c) for r in range(GRID) for c in range(GRID)]
    rng.shuffle(free)
    for req in meta["include"]:
        for _ in range(req["count"]):
            color = req.get("color") or COLORS[rng.integers(len(COLORS))]
            if "position" in req:
                relation, target = req["position"]
                t = next(o for o in objs if o["req"] == target)
                if t["cell"][0] in (0, GRID - 1) or t["cell"][1] in (0, GRID - 1):  # move the target inwards
                    t["cell"] = (int(rng.integers(1, GRID - 1)), int(rng.integers(1, GRID - 1)))
                dr, dc = STEP[relation]
                cell = (t["cell"][0] + dr, t["cell"][1] + dc)
            else:
                cell = next(c for c in free if all(o["cell"] != c for o in objs))
            objs.append({"class": req["class"], "color": color, "cell": cell, "score": 0.95,
                         "req": meta["include"].index(req)})
    return objs


def render(objs: list[dict], size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), BACKGROUND)
    labels = Image.new("L", (size, size), 0)
    cell = size // GRID
    for k, o in enumerate(objs, 1):
        r, c = o["cell"]
        w, h = (cell * rng.uniform(0.5, 0.8, 2)).astype(int)
        x0, y0 = c * cell + (cell - w) // 2, r * cell + (cell - h) // 2
        for canvas, fill in ((img, PALETTE[o["color"]]), (labels, k)):
            ImageDraw.Draw(canvas).ellipse([x0, y0, x0 + w, y0 + h], fill=fill)
    lab = np.asarray(labels)
    return np.asarray(img), [lab == k for k in range(1, len(objs) + 1)]


def detections(objs: list[dict], masks: list[np.ndarray]) -> dict[str, list[Detection]]:
    out: dict[str, list[Detection]] = defaultdict(list)
    for o, m in zip(objs, masks):
        ys, xs = np.nonzero(m)
        out[o["class"]].append(Detection((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), o["score"], m))
    return out


def colour_of(image: np.ndarray):
    """Nearest palette colour of the mean masked pixel -- the stand-in for CLIP."""
    protos = np.array([PALETTE[c] for c in COLORS], np.float64)

    def classify(found, name):
        return [COLORS[int(np.argmin(((protos - image[d.mask].mean(0)) ** 2).sum(1)))] for d in found]

    return classify


def variants(meta: dict, objs: list[dict], rng: np.random.Generator, classes: list[str]):
    """``(name, objects, expected GenEval verdict)`` for the faithful scene and its corruptions."""
    yield "faithful", objs, True
    drop = [o for o in objs if o["req"] == len(meta["include"]) - 1]
    yield "drop one", [o for o in objs if o is not drop[0]], False
    tag = meta["tag"]
    if tag in ("colors", "color_attr"):
        o = next(o for o in objs if o["req"] == 0)
        other = [c for c in COLORS if c != o["color"]][rng.integers(len(COLORS) - 1)]
        yield "recolour", [dict(x, color=other) if x is o else x for x in objs], False
    free = [(r, c) for r in range(GRID) for c in range(GRID) if all(o["cell"] != (r, c) for o in objs)]
    if tag == "counting":
        extra = dict(objs[0], cell=free[0])
        yield "one extra", objs + [extra], False
        yield "extra at score 0.5", objs + [dict(extra, score=0.5)], True
    if tag == "position":
        a, b = objs
        yield "swapped", [dict(a, cell=b["cell"]), dict(b, cell=a["cell"])], False
    present = {req["class"] for req in meta["include"]}
    unrelated = next(c for c in classes[rng.integers(len(classes)):] + classes if c not in present)
    yield "unrelated object", objs + [dict(objs[0], **{"class": unrelated, "cell": free[-1]})], True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    classes = prompt_sets.geneval_object_names()
    agree: dict[tuple[str, str], list[bool]] = defaultdict(list)
    partial: dict[str, list[float]] = defaultdict(list)
    t0 = time.perf_counter()
    for meta in prompt_sets.metadata("geneval/benchmark"):
        for name, objs, expected in variants(meta, scene(meta, rng), rng, classes):
            image, masks = render(objs, args.size, rng)
            v = judge(detections(objs, masks), meta, colour_of(image))
            agree[(meta["tag"], name)].append(v.correct == expected)
            partial[name].append(v.score)
    print(f"GenEval rules on rendered scenes ({args.size}x{args.size}, seed {args.seed}, "
          f"{time.perf_counter() - t0:.1f} s): share scored as expected")
    print(f"{'task':<14} {'variant':<20} {'n':>4} {'agree':>7}")
    for (tag, name), ok in sorted(agree.items()):
        print(f"{tag:<14} {name:<20} {len(ok):>4} {np.mean(ok):>7.3f}")
    total = [x for v in agree.values() for x in v]
    print(f"overall: {np.mean(total):.4f} of {len(total)} scenes")
    print("Flow-GRPO partial credit, mean by variant: " +
          ", ".join(f"{k} {np.mean(v):.3f}" for k, v in partial.items()))


if __name__ == "__main__":
    main()
