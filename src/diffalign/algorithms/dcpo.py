"""Dual Caption Preference Optimization (DCPO; Saeidi et al. 2025, "Dual Caption Preference
Optimization for Diffusion Models").

Diffusion-DPO conditions both images of a pair on the one prompt ``c``, although the rejected
image often does not show it (the "irrelevant prompt" issue), and the chosen and rejected
distributions overlap. DCPO gives the rejected image its own caption ``c^l`` -- a distractor
that describes it -- and conditions each branch on its own caption::

    L = -log sigmoid(-beta T w(t) [ (||e - e_theta(x^w_t, c^w)||^2 - ||e - e_ref(x^w_t, c^w)||^2)
                                   - (||e - e_theta(x^l_t, c^l)||^2 - ||e - e_ref(x^l_t, c^l)||^2) ])

with ``c^w = c``. Where the distractor comes from (``distractor``; the paper's three strategies
are captioning, perturbation and a hybrid):

- ``caption``: a caption of the rejected image. On the shapes world the verifier's detections
  describe it in the prompt grammar (``"three red circles"``, ``"a blue square left of a green
  triangle"``; the empty prompt when nothing is detected).
- ``perturb``: the prompt with one attribute changed (a count, colour or shape, or a relation
  reversed), drawn from the epoch's seed -- a caption the rejected image is likely to match
  better than the prompt. Shapes-world prompts only.
- ``hybrid``: the caption, or the perturbed prompt where the caption equals the prompt.
- ``file``: each pair's ``rejected_prompt`` in the pairs file (the Pick-Double Caption layout);
  the way to use DCPO beyond the shapes world.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ..config import check_choice
from ..worlds import shapes
from ._policy_gradient import _unwrap
from .preference import DiffusionDPO, DPOConfig, PairBatch

DISTRACTORS = ("caption", "perturb", "hybrid", "file")
_COUNT_WORD = {v: k for k, v in shapes.COUNTS.items()}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _count_caption(n: int, color: str, shape: str) -> str:
    n = min(n, max(shapes.COUNTS.values()))
    return f"{_COUNT_WORD[n]} {color} {shape}{'s' if n > 1 else ''}"


def caption_objects(objects: list[dict]) -> str:
    """A shapes-world prompt describing detected objects (``shapes.detect``): one kind of object
    -> its count; two different objects -> the first relation between them that holds; otherwise
    the most frequent kind with its count; nothing recognisable -> ``""``."""
    objs = [o for o in objects if o["color"] in shapes.COLORS and o["shape"] in shapes.SHAPES]
    if not objs:
        return ""
    kinds = [(o["color"], o["shape"]) for o in objs]
    if len(objs) == 2 and kinds[0] != kinds[1]:
        a, b = objs
        for rel in shapes.RELATIONS:
            if shapes.relation_holds(a["center"], b["center"], rel):
                return f"a {a['color']} {a['shape']} {rel} a {b['color']} {b['shape']}"
    (color, shape), n = max(((k, kinds.count(k)) for k in dict.fromkeys(kinds)), key=lambda kv: kv[1])
    return _count_caption(n, color, shape)


def perturb_prompt(prompt: str, rng: np.random.Generator) -> str:
    """The prompt with one attribute changed at random (always a different, valid prompt)."""
    p = shapes.parse(prompt)
    if p.kind == "count":
        attr = rng.choice(["count", "color", "shape"])
        n, color, shape = p.count, p.color, p.shape
        if attr == "count":
            n = int(rng.choice([c for c in shapes.COUNTS.values() if c != n]))
        elif attr == "color":
            color = str(rng.choice([c for c in shapes.COLORS if c != color]))
        else:
            shape = str(rng.choice([s for s in shapes.SHAPES if s != shape]))
        return _count_caption(n, color, shape)
    (ca, sa), rel, (cb, sb) = p.a, p.relation, p.b
    attr = rng.choice(["relation", "color", "shape"])
    if attr == "relation":
        rel = _OPPOSITE[rel]
    else:
        options = ([(c, sa) for c in shapes.COLORS if c != ca] if attr == "color"
                   else [(ca, s) for s in shapes.SHAPES if s != sa])
        options = [o for o in options if o != (cb, sb)]
        ca, sa = options[rng.integers(len(options))]
    return f"a {ca} {sa} {rel} a {cb} {sb}"


@dataclass
class DCPOConfig(DPOConfig):
    distractor: str = "caption"  # where the rejected image's caption c^l comes from (module docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("distractor", self.distractor, DISTRACTORS)
        if self.distractor == "file" and self.source != "file":
            raise ValueError(f"distractor 'file' reads each pair's rejected_prompt from a pairs file; it needs "
                             f"source 'file', got source {self.source!r}")


class DCPO(DiffusionDPO):
    name = "dcpo"

    def distractors(self, batch: PairBatch, seed: int) -> list[str]:
        """``c^l`` for each rejected sample of the batch."""
        how, rej = self.cfg.distractor, batch.rejected.tolist()
        if how == "file":
            out = [p.rejected_prompt for p in batch.source_pairs]
            missing = [p.pair_id or i for i, p in enumerate(batch.source_pairs) if p.rejected_prompt is None]
            if missing:
                raise ValueError(f"distractor 'file': pairs {missing[:5]} of {self.cfg.data!r} have no rejected_prompt")
            return out
        prompts = [batch.prompts[i] for i in rej]
        bad = [p for p in prompts if not shapes.is_prompt(p)]
        if bad:
            raise ValueError(f"distractor {how!r} needs shapes-world prompts, got {bad[0]!r}; for other prompts give "
                             "each pair a rejected_prompt in the pairs file (distractor: file)")
        rng = np.random.default_rng(seed)
        perturbed = [perturb_prompt(p, rng) for p in prompts]
        if how == "perturb":
            return perturbed
        captions = [caption_objects(o) for o in shapes.detect(batch.pixels[rej].permute(0, 2, 3, 1).numpy())]
        if how == "caption":
            return captions
        return [c if c != p else q for c, p, q in zip(captions, prompts, perturbed)]

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> PairBatch:
        batch = super().collect(model, prompts, epoch=epoch, seed=seed)
        if len(batch.rejected) == 0:
            return batch
        conditioned = list(batch.prompts)
        distractors = self.distractors(batch, seed)
        for i, d in zip(batch.rejected.tolist(), distractors):
            conditioned[i] = d
        batch.cond = _unwrap(model).encode_prompts(conditioned)  # batch.prompts (held-out rewards) stay the prompts
        batch.info["distractor_is_prompt"] = float(np.mean([d == batch.prompts[i] for i, d in
                                                            zip(batch.rejected.tolist(), distractors)]))
        return batch


PRESETS: dict[str, tuple[type, type, dict]] = {"dcpo": (DCPOConfig, DCPO, {})}
