"""Metrics of the shapes world over :func:`shapes.verify`'s results and over a model's text conditioning:
accuracy by category, the relation breakdown (how relations fail), the order gap of a text encoder and a
model's held-out profile under its default sampling (docs/shapes.md, "Learning relations")."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..core import generate
from . import shapes

_COUNT_WORD = {v: k for k, v in shapes.COUNTS.items()}


def accuracy_by_category(prompts: Sequence[str], correct: Sequence[bool] | np.ndarray) -> dict[str, float]:
    """Mean exact accuracy per category: one/two/three/four, count (all count prompts), relation, overall.
    Only categories that occur are present."""
    correct = np.asarray(correct, bool)
    if len(correct) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(correct)} results")
    cats = []
    for p in map(shapes.parse, prompts):
        cats.append(("relation",) if p.kind == "relation" else (_COUNT_WORD[p.count], "count"))  # type: ignore[index]
    out: dict[str, float] = {}
    for name in (*shapes.COUNTS, "count", "relation"):
        sel = np.array([name in c for c in cats], bool)
        if sel.any():
            out[name] = float(correct[sel].mean())
    if len(correct):
        out["overall"] = float(correct.mean())
    return out


def breakdown(prompts: Sequence[str], result: shapes.VerifyResult) -> dict[str, float]:
    """What an image gets right short of exact accuracy (GenEval's "colors" task, and how relations fail).

    Count prompts: ``colour`` = P(at least one object is detected and every detected object has the
    named colour). Relation prompts: ``both_right`` = P(exactly the two named objects, right colours and
    shapes), ``relation_given_both`` = P(the relation holds | both right) -- placement at chance gives
    about 0.25 --, ``swapped_given_both`` = P(the relation holds with the objects exchanged | both right)
    -- the right axis, the wrong order -- and ``relation`` = P(both right and the relation), the exact
    accuracy. ``n_count`` / ``n_relation`` / ``n_both`` count the images behind each rate; a rate with
    no image behind it is absent.
    """
    if len(prompts) != len(result.correct):
        raise ValueError(f"got {len(prompts)} prompts but {len(result.correct)} results")
    rel_sel = np.array([shapes.parse(p).kind == "relation" for p in prompts], bool)
    out: dict[str, float] = {"n_count": int((~rel_sel).sum()), "n_relation": int(rel_sel.sum())}
    if (~rel_sel).any():
        found = np.array([len(o) > 0 for o in result.objects], bool)[~rel_sel]
        out["colour"] = float((found & (result.criteria["color"][~rel_sel] == 1.0)).mean())
    if rel_sel.any():
        both = result.criteria["count"][rel_sel] == 1.0  # 1 iff both objects are present and nothing else is
        rel = result.criteria["relation"][rel_sel] == 1.0
        out.update(both_right=float(both.mean()), relation=float((both & rel).mean()), n_both=int(both.sum()))
        if both.any():
            out["relation_given_both"] = float(rel[both].mean())
            idx = np.flatnonzero(rel_sel)[both]
            out["swapped_given_both"] = float(np.mean([_swapped(prompts[i], result.objects[i]) for i in idx]))
    return out


def _swapped(prompt: str, objects: list[dict[str, Any]]) -> bool:
    """With exactly the two named objects detected: do they hold the relation in the reversed order
    ("B left of A" for "A left of B")? The placement knows the axis but not which object goes first."""
    p = shapes.parse(prompt)
    a = next(o for o in objects if (o["color"], o["shape"]) == p.a)
    b = next(o for o in objects if (o["color"], o["shape"]) == p.b)
    return shapes.relation_holds(b["center"], a["center"], str(p.relation))


def order_gap(model, prompts: Sequence[str]) -> dict[str, float]:
    """How far ``model``'s text encoder separates a relation prompt from its swapped twin, as the UNet sees
    it: ``pooled`` = mean over prompts of 1 - cos between the mean-pooled token features (the FiLM path),
    ``object`` = mean of 1 - cos between the features of an object's two words in the prompt and of the same
    words, now naming the other role, in the twin (the cross-attention path). An order-blind encoder gives
    0; count prompts are skipped."""
    rel = [p for p in prompts if shapes.parse(p).kind == "relation"]
    if not rel:
        raise ValueError("order_gap needs at least one relation prompt, got none")
    with torch.no_grad():
        a, b = model.encode_prompts(rel), model.encode_prompts([shapes.swapped(p) for p in rel])
    keep = (~a.pad_mask).unsqueeze(-1).float()
    pooled_a, pooled_b = (a.tokens * keep).sum(1) / keep.sum(1), (b.tokens * keep).sum(1) / keep.sum(1)
    cos = torch.nn.functional.cosine_similarity
    obj = []
    for i, p in enumerate(rel):
        n = len(p.split())  # object A: words 1-2 of p and words n-2..n-1 of the twin
        obj.append(1 - cos(a.tokens[i, 1:3].flatten(), b.tokens[i, n - 2:n].flatten(), dim=0))
    return {"pooled": float((1 - cos(pooled_a, pooled_b, dim=-1)).mean()), "object": float(torch.stack(obj).mean())}


def swap_test(model, prompts: Sequence[str], seeds: Sequence[int], batch: int = 128) -> dict[str, float]:
    """Does the model read the object order? Each relation prompt and its swapped twin ("B left of A" for
    "A left of B") are sampled from the same noise (default sampling). Over the pairs where both images
    hold exactly the two named objects: ``both`` = share where both images satisfy their prompt, ``one`` =
    exactly one, ``same_place`` = share where object A lands within 4 px of the same spot in both. An
    order-blind model draws one image for the two prompts (``one`` ~ 1, ``same_place`` ~ 1); a model that
    binds each object to its side draws two (``both`` -> 1). ``n`` = pairs counted."""
    rel = [p for p in prompts if shapes.parse(p).kind == "relation"]
    if not rel:
        raise ValueError("swap_test needs at least one relation prompt, got none")
    seeds = [s for p, s in zip(prompts, seeds) if shapes.parse(p).kind == "relation"]
    twins = [shapes.swapped(p) for p in rel]
    was_training = model.training
    model.eval()
    res = [shapes.verify(generate(model, ps, seeds, batch_size=batch, **model.sampling_defaults), ps)
           for ps in (rel, twins)]  # generate batches (``batch`` at a time) and runs without gradients itself
    model.train(was_training)

    def object_a(r: shapes.VerifyResult, i: int, p: str) -> dict[str, Any] | None:
        q, objs = shapes.parse(p), r.objects[i]
        a = [o for o in objs if (o["color"], o["shape"]) == q.a]
        b = [o for o in objs if (o["color"], o["shape"]) == q.b]
        return a[0] if len(objs) == 2 and len(a) == len(b) == 1 else None

    both = one = same = n = 0
    for i, p in enumerate(rel):
        a1, a2 = object_a(res[0], i, p), object_a(res[1], i, p)
        if a1 is None or a2 is None:
            continue
        ok1, ok2 = bool(res[0].correct[i]), bool(res[1].correct[i])
        n += 1
        both += ok1 and ok2
        one += ok1 != ok2
        same += float(np.hypot(a1["center"][0] - a2["center"][0], a1["center"][1] - a2["center"][1])) < 4
    nan = float("nan")
    return {"n": n, "both": both / n if n else nan, "one": one / n if n else nan, "same_place": same / n if n else nan}


def profile(model, prompts: Sequence[str], seeds: Sequence[int], batch: int = 128) -> dict[str, float]:
    """Verifier accuracy by category and the relation breakdown of ``model``'s default sampling
    (``model.sampling_defaults``), one image per (prompt, seed)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        images = torch.cat([generate(model, list(prompts[i:i + batch]), list(seeds[i:i + batch]),
                                     **model.sampling_defaults) for i in range(0, len(prompts), batch)])
    model.train(was_training)
    res = shapes.verify(images, list(prompts))
    return {**accuracy_by_category(prompts, res.correct), **breakdown(prompts, res)}
