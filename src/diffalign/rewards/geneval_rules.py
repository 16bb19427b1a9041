"""GenEval's rules (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating
Text-to-Image Alignment") on detections, with no model: which detections count, where an object
is relative to another, whether an image meets its prompt's metadata, Flow-GRPO's partial
credit, and GenEval's summary table.

A prompt's metadata (``data/prompts/geneval/*.jsonl``) is ``{"tag", "prompt", "include": [{"class",
"count", "color"?, "position": [relation, index of an earlier include]?}], "exclude": [{"class",
"count"}]}``; the six tags are ``single_object``, ``two_object``, ``counting``, ``colors``,
``position``, ``color_attr``.

Detections are ``{class name: [Detection, ...]}``, most confident first. Colours come from a
callable ``colors(detections, class_name) -> [colour name per detection]`` (CLIP zero-shot in
``rewards/geneval.py``; any stub in tests), called only when a requirement names a colour.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

THRESHOLD = 0.3  # detection score a detection must exceed
COUNTING_THRESHOLD = 0.9  # ... on `counting` prompts
MAX_OBJECTS = 16  # detections kept per class
POSITION_THRESHOLD = 0.1  # relative margin: |offset| minus 0.1 x (sum of the two boxes' sizes)
MAX_OVERLAP = 1.0  # IoU above which a weaker detection of a class is dropped (1.0: none is)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")

ColorFn = Callable[[Sequence["Detection"], str], Sequence[str]]


@dataclass
class Detection:
    """One detected object: ``box = (x1, y1, x2, y2)`` in pixels, ``score`` in [0, 1], optional
    boolean ``mask [H, W]`` (used to cut the object out for its colour)."""

    box: tuple[float, float, float, float]
    score: float
    mask: Any = None


@dataclass
class Verdict:
    """The rules' answer for one image."""

    correct: bool  # GenEval's rule (the benchmark)
    strict: bool  # Flow-GRPO's strict accuracy: every include count met exactly
    score: float  # Flow-GRPO's partial credit
    reasons: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # objects counted per class


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two pixel boxes, counting inclusive pixel ranges (+1) as
    GenEval does."""
    def area(x1: float, y1: float, x2: float, y2: float) -> float:
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def select(detections: Mapping[str, Iterable[Detection]], tag: str, *, threshold: float = THRESHOLD,
           counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS,
           max_overlap: float = MAX_OVERLAP) -> dict[str, list[Detection]]:
    """The detections GenEval counts: score above the threshold of the prompt's tag (0.9 for
    counting, else 0.3), the ``max_objects`` most confident per class, then (only when
    ``max_overlap < 1``) greedy suppression of weaker boxes overlapping a kept one."""
    thr = counting_threshold if tag == "counting" else threshold
    out: dict[str, list[Detection]] = {}
    for name, dets in detections.items():
        ranked = sorted((d for d in dets if d.score > thr), key=lambda d: -d.score)[:max_objects]
        kept: list[Detection] = []
        for d in ranked:
            if max_overlap >= 1 or all(iou(d.box, k.box) < max_overlap for k in kept):
                kept.append(d)
        if kept:
            out[name] = kept
    return out


def relative_position(a: Detection, b: Detection, margin: float = POSITION_THRESHOLD) -> set[str]:
    """Where ``a`` lies relative to ``b``: the centre offset, shrunk towards 0 on each axis by
    ``margin`` x (the two boxes' sizes on that axis), then normalised by the unshrunk offset's
    length; an axis whose share exceeds 0.5 names a relation (image y grows downwards)."""
    ba, bb = np.asarray(a.box[:4], np.float64), np.asarray(b.box[:4], np.float64)
    offset = (ba[:2] + ba[2:]) / 2 - (bb[:2] + bb[2:]) / 2
    size_a, size_b = np.abs(ba[2:] - ba[:2]), np.abs(bb[2:] - bb[:2])
    shrunk = np.maximum(np.abs(offset) - margin * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def _position_fails(found: Sequence[Detection], targets: Sequence[Detection], relation: str,
                    margin: float) -> str | None:
    for obj in found:
        for target in targets:
            rel = relative_position(obj, target, margin)
            if relation not in rel:
                return f"expected {relation} target, found {' and '.join(sorted(rel)) or 'no relation'}"
    return None


def geneval_correct(objects: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any], colors: ColorFn,
                    margin: float = POSITION_THRESHOLD) -> tuple[bool, list[str]]:
    """GenEval's verdict: every ``include`` holds (at least ``count`` objects of the class; among
    the ``count`` most confident, ``count`` of the colour; each of them in the relation to every
    object matched by the referenced include) and no ``exclude`` is reached (fewer than ``count``)."""
    correct, reasons, matched = True, [], []
    for req in metadata.get("include", []):
        name, n = req["class"], req["count"]
        found = list(objects.get(name, []))[:n]
        ok = len(found) >= n
        if not ok:
            reasons.append(f"expected {name}>={n}, found {len(found)}")
        else:
            if "color" in req:
                got = list(colors(found, name))
                if got.count(req["color"]) < n:
                    ok = False
                    reasons.append(f"expected {req['color']} {name}>={n}, found colours {got}")
            if "position" in req and ok:
                relation, target = req["position"]
                if matched[target] is None:
                    ok = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    why = _position_fails(found, matched[target], relation, margin)
                    if why:
                        ok = False
                        reasons.append(f"{name}: {why}")
        correct &= ok
        matched.append(found if ok else None)
    for req in metadata.get("exclude", []):
        have = len(objects.get(req["class"], []))
        if have >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {have}")
    return correct, reasons


def partial_credit(objects: Mapping[str, Sequence[Detection]], metadata: Mapping[str, Any], colors: ColorFn,
                   margin: float = POSITION_THRESHOLD) -> tuple[float, bool]:
    """Flow-GRPO's GenEval reward (its reward server's ``evaluate_reward``), term by term:

    * per include, ``1 - |count - found| / count`` over *all* kept detections of the class (this
      goes below 0 when more than twice ``count`` are found: -1 for three of one requested object);
    * a wrong count adds one more 0 term when the include also names a colour or a position;
    * with the count right: a colour adds ``1 - |count - n_colour| / count``; a position adds 0 when
      its target include failed, else 0 at the first object pair out of relation *and then* 1 --
      a failed position earns one 0 and one 1, as in the reference;
    * the score is the mean of the terms; ``strict`` is True when every include holds with the
      exact count (excludes are not consulted).

    Returns ``(score, strict)``.
    """
    terms: list[float] = []
    strict, matched = True, []
    for req in metadata.get("include", []):
        name, n = req["class"], req["count"]
        found = list(objects.get(name, []))
        ok = len(found) == n
        terms.append(1 - abs(n - len(found)) / n)
        if not ok:
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                hits = list(colors(found, name)).count(req["color"])
                terms.append(1 - abs(n - hits) / n)
                ok = hits == n
            if "position" in req and ok:
                relation, target = req["position"]
                if matched[target] is None:
                    ok = False
                    terms.append(0.0)
                else:
                    if _position_fails(found, matched[target], relation, margin):
                        ok = False
                        terms.append(0.0)
                    terms.append(1.0)
        strict &= ok
        matched.append(found if ok else None)
    return (sum(terms) / len(terms) if terms else 0.0), strict


def judge(detections: Mapping[str, Iterable[Detection]], metadata: Mapping[str, Any], colors: ColorFn,
          **select_kwargs: Any) -> Verdict:
    """Select the detections GenEval counts for this prompt's tag, then apply both rules. Colours
    are classified once per class (each crop on its own, so the colours of the ``count`` most
    confident objects are a prefix of those of all of them)."""
    objects = select(detections, metadata["tag"], **select_kwargs)
    cache: dict[str, list[str]] = {}

    def cached(found: Sequence[Detection], name: str) -> list[str]:
        every = objects.get(name, [])
        if len(found) > len(every) or any(a is not b for a, b in zip(found, every)):
            return list(colors(found, name))
        if name not in cache:
            cache[name] = list(colors(every, name))
        return cache[name][:len(found)]

    correct, reasons = geneval_correct(objects, metadata, cached)
    score, strict = partial_credit(objects, metadata, cached)
    return Verdict(correct=correct, strict=strict, score=float(score), reasons=reasons,
                   counts={k: len(v) for k, v in objects.items()})


def check_metadata(meta: Any, where: str = "metadata") -> dict:
    """Validate one metadata dict; ``ValueError`` naming the problem."""
    if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
        raise ValueError(f"{where}: GenEval metadata must be a dict with a 'prompt' string, got {str(meta)[:120]}")
    if meta.get("tag") not in TAGS:
        raise ValueError(f"{where}: tag must be one of {list(TAGS)}, got {meta.get('tag')!r}")
    for key in ("include", "exclude"):
        for req in meta.get(key, []):
            if not isinstance(req, dict) or not isinstance(req.get("class"), str) or \
                    not isinstance(req.get("count"), int) or req["count"] < 1:
                raise ValueError(f"{where}: each {key} entry needs a 'class' string and a 'count' >= 1, got {req}")
            if req.get("color") is not None and req["color"] not in COLORS:
                raise ValueError(f"{where}: colour must be one of {list(COLORS)}, got {req['color']!r}")
            pos = req.get("position")
            if pos is not None and (len(pos) != 2 or pos[0] not in RELATIONS):
                raise ValueError(f"{where}: position must be [relation, include index] with relation in "
                                 f"{list(RELATIONS)}, got {pos}")
    return meta


class MetadataIndex:
    """``prompt -> metadata`` over shipped GenEval sets (``"geneval/benchmark"``) and JSONL files."""

    def __init__(self, sources: Sequence[str] = ("geneval/benchmark",)):
        from ..data import prompt_sets

        self.by_prompt: dict[str, dict] = {}
        self.sources = list(sources)
        for src in self.sources:
            if src in prompt_sets.SETS:
                rows = prompt_sets.metadata(src)
            else:
                file = Path(src)
                if not file.is_file():
                    raise FileNotFoundError(f"geneval metadata {src!r} is neither a shipped set "
                                            f"({', '.join(prompt_sets.names())}) nor an existing JSONL file")
                rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
            for i, row in enumerate(rows):
                check_metadata(row, f"{src} line {i + 1}")
                old = self.by_prompt.setdefault(row["prompt"], row)
                if old != row:
                    raise ValueError(f"{src} line {i + 1}: prompt {row['prompt']!r} has two different metadata records")

    def __getitem__(self, prompt: str) -> dict:
        if prompt not in self.by_prompt:
            raise ValueError(f"geneval: no metadata for prompt {prompt!r} in {self.sources}; GenEval scores only "
                             "prompts with metadata (pass metadata=[set names or JSONL files])")
        return self.by_prompt[prompt]


def summary(tags: Sequence[str], prompts: Sequence[str], correct: Sequence[bool]) -> dict[str, Any]:
    """GenEval's summary over images: share of correct images, of prompts with at least one correct
    image, per-task accuracy (tasks in order of first appearance) and the overall score, the mean
    of the task accuracies."""
    c = np.asarray(correct, dtype=bool)
    tasks: dict[str, list[bool]] = {}
    for tag, ok in zip(tags, c):
        tasks.setdefault(tag, []).append(bool(ok))
    per_prompt: dict[str, bool] = {}
    for p, ok in zip(prompts, c):
        per_prompt[p] = per_prompt.get(p, False) or bool(ok)
    rows = {t: {"accuracy": float(np.mean(v)), "correct": int(sum(v)), "images": len(v)} for t, v in tasks.items()}
    return {"images": int(c.size), "prompts": len(per_prompt), "correct_images": float(c.mean()) if c.size else 0.0,
            "correct_prompts": float(np.mean(list(per_prompt.values()))) if per_prompt else 0.0,
            "tasks": rows, "overall": float(np.mean([r["accuracy"] for r in rows.values()])) if rows else 0.0}


def format_summary(s: Mapping[str, Any]) -> str:
    """The summary in the layout of GenEval's ``summary_scores.py``."""
    lines = ["Summary", "=======", f"Total images: {s['images']}", f"Total prompts: {s['prompts']}",
             f"% correct images: {s['correct_images']:.2%}", f"% correct prompts: {s['correct_prompts']:.2%}", "",
             "Task breakdown", "=============="]
    for tag, r in s["tasks"].items():
        lines.append(f"{tag:<16} = {r['accuracy']:.2%} ({r['correct']} / {r['images']})")
    lines += ["", f"Overall score (avg. over tasks): {s['overall']:.5f}"]
    return "\n".join(lines)
