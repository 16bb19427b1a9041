"""Tests for the shapes world (diffalign.worlds.shapes): grammar, splits, renderer, verifier."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from diffalign.worlds import shapes as S

COUNT_PROMPTS = S.all_prompts("count")
REL_PROMPTS = [S.all_prompts("relation")[i] for i in range(0, 840, 3)]  # 280, every pair and relation
PALETTE_SET = {tuple(v) for v in S.PALETTE.values()}


@pytest.fixture(scope="module")
def renders():
    prompts = COUNT_PROMPTS * 3 + REL_PROMPTS
    images, layouts = S.render_batch(prompts, seed=123)
    return prompts, images, layouts


# ------------------------------------------------------------------------------------ grammar
def test_constants():
    assert S.PALETTE == {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
                         "yellow": (235, 200, 30), "purple": (150, 60, 200)}
    assert S.RELATIONS == ("left of", "right of", "above", "below")
    assert S.COUNTS == {"one": 1, "two": 2, "three": 3, "four": 4}
    assert S.IMAGE_SIZE == 32 and S.VOCAB == sorted(S.VOCAB)
    words = {w for p in S.all_prompts() for w in p.split()}
    assert words == set(S.VOCAB)  # every vocab word is used, and nothing else


def test_parse_forms():
    assert S.parse("one red circle") == S.ParsedPrompt("count", count=1, color="red", shape="circle")
    p = S.parse("four blue triangles")
    assert (p.kind, p.count, p.color, p.shape) == ("count", 4, "blue", "triangle")
    p = S.parse("a green square right of a yellow circle")
    assert (p.kind, p.a, p.relation, p.b) == ("relation", ("green", "square"), "right of", ("yellow", "circle"))
    assert S.parse("a red circle below a red square").relation == "below"
    for prompt in S.all_prompts():
        S.parse(prompt)


def test_parse_errors():
    with pytest.raises(ValueError, match="'pink'"):
        S.parse("two pink circles")
    with pytest.raises(ValueError, match="unknown word 'hexagon'"):
        S.parse("a red hexagon left of a blue square")
    for bad in ("two red circle", "one red circles", "four blue triangle"):
        with pytest.raises(ValueError, match="plurality"):
            S.parse(bad)
    for bad in ("red two circles", "", "a red circle left a blue square", "a red circles above a blue square",
                "one red", "a red circle above"):
        with pytest.raises(ValueError, match="malformed prompt"):
            S.parse(bad)
    with pytest.raises(ValueError, match="same object"):
        S.parse("a red circle left of a red circle")


def test_all_prompts():
    assert len(COUNT_PROMPTS) == 60 and len(set(COUNT_PROMPTS)) == 60
    assert {"one red circle", "two red circles", "four blue triangles"} <= set(COUNT_PROMPTS)
    rel = S.all_prompts("relation")
    assert len(rel) == len(set(rel)) == 15 * 14 * 4
    assert S.all_prompts() == COUNT_PROMPTS + rel
    assert S.all_prompts() == S.all_prompts()  # deterministic order
    with pytest.raises(ValueError):
        S.all_prompts("colour")


def test_splits():
    allp = S.all_prompts()
    split = {p: S.split_of(p) for p in allp}
    assert set(split.values()) == {"train", "heldout"}
    held_c = [p for p in COUNT_PROMPTS if split[p] == "heldout"]
    held_r = [p for p in S.all_prompts("relation") if split[p] == "heldout"]
    assert len(held_c) == 12 and len(held_r) == 168  # 20% of count prompts, 21 of 105 pairs
    # the documented rule, pinned: (c + s + k - 1) % 5 == 0
    assert split["one red circle"] == "heldout" and split["two red circles"] == "train"
    assert split["four blue circles"] == "heldout" and split["one purple square"] == "heldout"
    train_c = [S.parse(p) for p in COUNT_PROMPTS if split[p] == "train"]
    assert {p.color for p in train_c} == set(S.COLORS)
    assert {p.shape for p in train_c} == set(S.SHAPES)
    assert {p.count for p in train_c} == {1, 2, 3, 4}
    # relation pairs are held out as unordered pairs, in every relation
    by_pair: dict[frozenset, set] = {}
    for p in S.all_prompts("relation"):
        q = S.parse(p)
        by_pair.setdefault(frozenset([q.a, q.b]), set()).add(split[p])
    assert len(by_pair) == 105 and all(len(v) == 1 for v in by_pair.values())
    assert sum(v == {"heldout"} for v in by_pair.values()) == 21
    train_objs = {o for pair, v in by_pair.items() if v == {"train"} for o in pair}
    assert len(train_objs) == 15


def test_sample_prompts():
    a = S.sample_prompts(400, seed=7)
    assert a == S.sample_prompts(400, seed=7) and a != S.sample_prompts(400, seed=8)
    assert all(S.split_of(p) == "train" for p in a)
    assert sum(S.parse(p).kind == "relation" for p in a) == 200
    h = S.sample_prompts(300, split="heldout", seed=1, relation_fraction=0.25)
    assert all(S.split_of(p) == "heldout" for p in h)
    assert sum(S.parse(p).kind == "relation" for p in h) == 75
    c = S.sample_prompts(4000, seed=3, kinds=("count",))
    counts = np.bincount([S.parse(p).count for p in c], minlength=5)[1:]
    assert counts.min() > 900 and counts.max() < 1100  # uniform over one..four
    assert all(S.parse(p).kind == "relation" for p in S.sample_prompts(50, kinds=("relation",)))
    assert S.sample_prompts(0) == []
    with pytest.raises(ValueError, match="train, heldout"):
        S.sample_prompts(3, split="test")
    for kwargs in ({"n": -1}, {"n": 2, "kinds": ("colour",)}, {"n": 2, "kinds": ()},
                   {"n": 2, "relation_fraction": 1.5}):
        with pytest.raises(ValueError):
            S.sample_prompts(**kwargs)


# ----------------------------------------------------------------------------------- renderer
def test_shape_masks():
    for n in range(S.MIN_SIZE, S.MAX_SIZE + 1):
        sq, ci, tr = (S.shape_mask(s, n) for s in ("square", "circle", "triangle"))
        assert sq.all()
        assert (ci == ci[::-1]).all() and (ci == ci[:, ::-1]).all() and (ci == ci.T).all()
        assert ci[n // 2].all() and ci[:, n // 2].all() and not ci[0, 0]  # spans its bbox, round
        assert 0.74 < ci.mean() < 0.9
        widths = tr.sum(1)
        assert (tr == tr[:, ::-1]).all() and (np.diff(widths) >= 0).all()  # symmetric, upward
        assert widths[-1] == n and 1 <= widths[0] <= 2 and 0.5 < tr.mean() < 0.72


def test_render_obeys_spec(renders):
    prompts, images, layouts = renders
    assert images.dtype == np.uint8 and images.shape == (len(prompts), 32, 32, 3)
    for prompt, img, layout in zip(prompts, images, layouts):
        p = S.parse(prompt)
        want = [(p.color, p.shape)] * p.count if p.kind == "count" else [p.a, p.b]
        assert sorted((o["color"], o["shape"]) for o in layout) == sorted(want)
        covered = np.zeros((32, 32), bool)
        for o in layout:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
            assert x1 - x0 == y1 - y0 == o["size"] and 6 <= o["size"] <= 12
            mask = S.shape_mask(o["shape"], o["size"])
            assert (img[y0:y1, x0:x1][mask] == S.PALETTE[o["color"]]).all()
            full = np.zeros((32, 32), bool)
            full[y0:y1, x0:x1] = mask
            ys, xs = np.nonzero(full)
            assert np.allclose(o["center"], (xs.mean() + 0.5, ys.mean() + 0.5))
            covered |= full
        assert (img[~covered] == 255).all()  # nothing else drawn, no anti-aliasing
        assert {tuple(c) for c in img[covered]} <= {S.PALETTE[c] for c, _ in want}
        for a, b in itertools.combinations(layout, 2):  # >= 1 px gap between bboxes
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
            assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0
        if p.kind == "relation":
            a = next(o for o in layout if (o["color"], o["shape"]) == p.a)
            b = next(o for o in layout if (o["color"], o["shape"]) == p.b)
            (ax, ay), (bx, by) = a["center"], b["center"]
            along, other = {"left of": (bx - ax, ay - by), "right of": (ax - bx, ay - by),
                            "above": (by - ay, ax - bx), "below": (ay - by, ax - bx)}[p.relation]
            assert along > 0 and along >= abs(other) + 2


def test_render_deterministic():
    prompts = ["two red circles", "a blue square above a green triangle", "four yellow squares"]
    a, la = S.render_batch(prompts, seed=5)
    b, lb = S.render_batch(prompts, seed=5)
    assert (a == b).all() and la == lb
    assert not (a == S.render_batch(prompts, seed=6)[0]).all()
    c, _ = S.render_batch(prompts[:2], seed=5)  # an item does not depend on later prompts
    assert (c == a[:2]).all()
    img, lay = S.render("one red circle", np.random.default_rng(0))
    assert img.shape == (32, 32, 3) and len(lay) == 1
    with pytest.raises(RuntimeError, match="could not place"):
        S.render("four red squares", np.random.default_rng(0), max_tries=0)


# ----------------------------------------------------------------------------------- verifier
def test_correct_renders_score_one(renders):
    prompts, images, _ = renders
    r = S.verify(images, prompts)
    assert r.score.shape == r.correct.shape == (len(prompts),)
    assert r.correct.all() and (r.score == 1.0).all()
    for k in ("count", "color", "shape"):
        assert (r.criteria[k] == 1).all()
    is_rel = np.array([S.parse(p).kind == "relation" for p in prompts])
    assert np.isnan(r.criteria["relation"][~is_rel]).all() and (r.criteria["relation"][is_rel] == 1).all()
    assert len(r.objects) == len(prompts)


def _free_spot(layout, size, rng):
    for _ in range(10_000):
        x0, y0 = rng.integers(0, 33 - size, size=2)
        box = (int(x0), int(y0), int(x0) + size, int(y0) + size)
        if all(S._apart(box, o["bbox"]) for o in layout):
            return box
    return None


def test_corruptions_score_below_one(renders):
    prompts, _, layouts = renders
    rng = np.random.default_rng(0)
    imgs, ps, kinds = [], [], []
    for prompt, layout in zip(prompts[::2], layouts[::2]):
        i = int(rng.integers(len(layout)))
        o = layout[i]
        rest = layout[:i] + layout[i + 1:]
        imgs.append(S.draw(rest)); kinds.append("remove")
        other_c = [c for c in S.COLORS if c != o["color"]][int(rng.integers(4))]
        imgs.append(S.draw(rest + [{**o, "color": other_c}])); kinds.append("recolor")
        other_s = [s for s in S.SHAPES if s != o["shape"]][int(rng.integers(2))]
        imgs.append(S.draw(rest + [{**o, "shape": other_s}])); kinds.append("reshape")
        box = _free_spot(layout, 6, rng)
        if box is not None:
            extra = {"color": S.COLORS[int(rng.integers(5))], "shape": S.SHAPES[int(rng.integers(3))], "bbox": box}
            imgs.append(S.draw(layout + [extra])); kinds.append("extra")
        ps += [prompt] * (len(imgs) - len(ps))
    r = S.verify(np.stack(imgs), ps)
    kinds = np.array(kinds)
    assert len(kinds) > 600 and (kinds == "extra").sum() > 100
    assert not r.correct.any() and (r.score < 1).all()
    assert (r.score > 0).mean() > 0.5  # partial credit, not all-or-nothing
    count_ok = r.criteria["count"] == 1
    is_count = np.array([S.parse(p).kind == "count" for p in ps])
    assert not count_ok[kinds == "remove"].any() and not count_ok[(kinds == "extra") & ~is_count].any()
    assert (r.criteria["color"][(kinds == "recolor") & is_count] < 1).all()
    assert (r.criteria["shape"][(kinds == "reshape") & is_count] < 1).all()


def test_relation_violations():
    flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    prompts = REL_PROMPTS[:120]
    swapped = [p.replace(S.parse(p).relation, flip[S.parse(p).relation]) for p in prompts]
    imgs, layouts = S.render_batch(swapped, seed=9)  # the opposite relation
    r = S.verify(imgs, prompts)
    assert not r.correct.any() and (r.criteria["relation"] == 0).all()
    assert (r.criteria["count"] == 1).all() and np.allclose(r.score, 0.75)
    # mirroring a left/right image, or swapping the objects' places, breaks the relation too
    broken, bp = [], []
    for prompt, (a, b) in zip(prompts, S.render_batch(prompts, seed=10)[1]):
        q = S.parse(prompt)
        orig = S.draw([a, b])
        if q.relation in ("left of", "right of"):
            broken.append(orig[:, ::-1]); bp.append(prompt)
            continue
        moved = []
        for o, dst in ((a, b), (b, a)):  # centre each object on the other's bbox centre
            cx, cy = (dst["bbox"][0] + dst["bbox"][2]) // 2, (dst["bbox"][1] + dst["bbox"][3]) // 2
            x0 = min(max(cx - o["size"] // 2, 0), 32 - o["size"])
            y0 = min(max(cy - o["size"] // 2, 0), 32 - o["size"])
            moved.append({**o, "bbox": (x0, y0, x0 + o["size"], y0 + o["size"])})
        if S._apart(moved[0]["bbox"], moved[1]["bbox"]):
            broken.append(S.draw(moved)); bp.append(prompt)
    assert len(bp) > 60
    rb = S.verify(np.stack(broken), bp)
    assert not rb.correct.any() and (rb.criteria["relation"] == 0).all()
    # partial credit: one named object missing
    one = S.verify(np.stack([S.draw(lay[:1]) for lay in layouts]), prompts)
    assert (one.criteria["count"] == 0.5).all() and (one.criteria["relation"] == 0).all()


def test_partial_credit_count():
    img, lay = S.render("three red circles", np.random.default_rng(1))
    r = S.verify(S.draw(lay[:2])[None], ["three red circles"])
    assert r.criteria["count"][0] == pytest.approx(2 / 3) and r.criteria["color"][0] == 1
    assert r.score[0] == pytest.approx((2 / 3 + 2) / 3)
    r = S.verify(img[None], ["two red circles"])  # one too many
    assert r.criteria["count"][0] == pytest.approx(0.5) and not r.correct[0]
    r = S.verify(img[None], ["three blue circles"])  # right count/shape, wrong colour
    assert r.criteria["color"][0] == 0 and r.criteria["shape"][0] == 1 and r.criteria["count"][0] == 0


def test_detector_rejects_non_shapes():
    """Elongated boxes, downward triangles and diamonds are none of the three shapes."""
    imgs = np.full((4, 32, 32, 3), 255, np.uint8)
    imgs[0, 10:16, 5:17] = S.PALETTE["red"]  # 12x6 rectangle
    imgs[1, 10:20, 10:20][S.shape_mask("triangle", 10)[::-1]] = S.PALETTE["red"]  # pointing down
    yy, xx = np.mgrid[:11, :11]
    imgs[2, 5:16, 5:16][np.abs(yy - 5) + np.abs(xx - 5) <= 5] = S.PALETTE["red"]  # diamond
    imgs[3, 5:15, 5:15] = S.PALETTE["red"]  # a real square, for contrast
    r = S.verify(imgs, ["one red square", "one red triangle", "one red triangle", "one red square"])
    assert [o[0]["shape"] for o in r.objects] == ["unknown", "unknown", "unknown", "square"]
    assert r.correct.tolist() == [False, False, False, True]


def _noisy_variants(images, rng):
    f = images.astype(np.float32)
    box = ndimage.uniform_filter(f, size=(1, 3, 3, 1), mode="nearest")
    yield "noise", np.clip(f + rng.normal(0, 10, f.shape), 0, 255).round().astype(np.uint8)
    yield "box50", (0.5 * f + 0.5 * box).round().astype(np.uint8)
    yield "gauss", ndimage.gaussian_filter(f, sigma=(0, 0.6, 0.6, 0)).round().astype(np.uint8)
    stray = images.copy()
    for img in stray:
        for _ in range(5):
            y, x = rng.integers(0, 32, 2)
            img[y, x] = rng.integers(0, 256, 3) if rng.random() < 0.5 else S.PALETTE[S.COLORS[rng.integers(5)]]
    yield "stray", stray
    bg = (images == 255).all(-1, keepdims=True)
    yield "tint", np.where(bg, np.array([245, 238, 228]), images).astype(np.uint8)


def test_robust_to_mild_corruption(renders):
    prompts, images, _ = renders
    rng = np.random.default_rng(0)
    for name, x in _noisy_variants(images, rng):
        r = S.verify(x, prompts)
        assert r.correct.all(), (name, [p for p, c in zip(prompts, r.correct) if not c][:5])


def test_white_and_noise_score_low():
    prompts = COUNT_PROMPTS[:30] + REL_PROMPTS[:30]
    white = S.verify(np.full((60, 32, 32, 3), 255, np.uint8), prompts)
    assert (white.score == 0).all() and not white.correct.any()
    noise = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3)).astype(np.uint8)
    r = S.verify(noise, prompts)
    assert not r.correct.any() and r.score.mean() < 0.3


# ---------------------------------------------------------------------------------- interface
def test_verify_input_formats():
    torch = pytest.importorskip("torch")
    prompts = ["two red circles", "a blue square left of a green triangle", "one yellow triangle"]
    imgs, _ = S.render_batch(prompts, seed=3)
    imgs = ndimage.uniform_filter(imgs.astype(np.float32), size=(1, 3, 3, 1)).round().astype(np.uint8)  # not exact
    ref = S.verify(imgs, prompts)
    t = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    for other in (S.verify(t, prompts), S.verify(imgs.astype(np.float32) / 255, prompts)):
        assert np.array_equal(ref.score, other.score) and np.array_equal(ref.correct, other.correct)
        for k in ref.criteria:
            assert np.array_equal(ref.criteria[k], other.criteria[k], equal_nan=True)
    single = S.verify(imgs[0].astype(np.float64) / 255, prompts[0])  # one float HWC image
    assert single.score.shape == (1,) and single.score[0] == ref.score[0]
    with pytest.raises(ValueError, match="prompts"):
        S.verify(imgs, prompts[:2])
    for bad in (imgs[:, :16], imgs[..., :2], imgs[None], t[:, :, :16]):
        with pytest.raises(ValueError):
            S.verify(bad, prompts)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        S.verify(t * 2 - 1, prompts)
    with pytest.raises(ValueError, match="pink"):
        S.verify(imgs, ["two pink circles"] * 3)


def test_accuracy_by_category():
    prompts = ["one red circle", "two red circles", "two blue squares", "a red circle above a blue square"]
    acc = S.accuracy_by_category(prompts, [True, True, False, False])
    assert acc == {"one": 1.0, "two": 0.5, "count": 2 / 3, "relation": 0.0, "overall": 0.5}
    assert "relation" not in S.accuracy_by_category(prompts[:1], [True])
    with pytest.raises(ValueError):
        S.accuracy_by_category(prompts, [True])


def test_verify_speed(renders):
    import time

    prompts, images, _ = renders
    t0 = time.perf_counter()
    S.verify(images[:256], prompts[:256])
    assert time.perf_counter() - t0 < 1.0
