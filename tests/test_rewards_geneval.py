"""GenEval: the rule layer on hand-made detections (no model, no network) and the model layer
(Mask2Former + CLIP) on tiny random checkpoints built offline."""

import json

import numpy as np
import pytest
import torch

from diffalign import rewards
from diffalign.data import prompt_sets
from diffalign.rewards import geneval_rules as R
from diffalign.rewards.geneval_rules import Detection


def det(x1, y1, x2, y2, score=0.95):
    return Detection((x1, y1, x2, y2), score)


def colours_of(table):
    """A colour classifier stub: the colour a test assigned to each detection."""
    return lambda found, name: [table[id(d)] for d in found]


def no_colours(found, name):
    raise AssertionError("colours were asked for on a prompt without colours")


def test_select_thresholds_and_cap():
    dets = {"cat": [det(0, 0, 5, 5, s) for s in (0.3, 0.31, 0.89, 0.95)]}
    assert [d.score for d in R.select(dets, "single_object")["cat"]] == [0.95, 0.89, 0.31]  # > 0.3, strictly
    assert [d.score for d in R.select(dets, "counting")["cat"]] == [0.95]  # counting: > 0.9
    many = {"dog": [det(i, 0, i + 1, 1, 0.5 + i / 100) for i in range(20)]}
    kept = R.select(many, "two_object")["dog"]
    assert len(kept) == R.MAX_OBJECTS == 16 and kept[0].score == pytest.approx(0.69)
    assert R.select({"cat": [det(0, 0, 1, 1, 0.1)]}, "single_object") == {}


def test_counting_threshold_decides_the_count():
    meta = {"tag": "counting", "prompt": "a photo of three cats", "include": [{"class": "cat", "count": 3}],
            "exclude": [{"class": "cat", "count": 4}]}
    three = [det(10 * i, 0, 10 * i + 8, 8) for i in range(3)]
    assert R.judge({"cat": three}, meta, no_colours).correct
    assert not R.judge({"cat": three + [det(40, 0, 48, 8, 0.95)]}, meta, no_colours).correct  # four
    v = R.judge({"cat": three + [det(40, 0, 48, 8, 0.85)]}, meta, no_colours)  # 4th below 0.9: not counted
    assert v.correct and v.strict and v.score == 1.0 and v.counts == {"cat": 3}
    v = R.judge({"cat": three[:2]}, meta, no_colours)
    assert not v.correct and v.score == pytest.approx(1 - 1 / 3) and "cat>=3" in v.reasons[0]


@pytest.mark.parametrize("d,expected", [(1.9, set()), (4.0, set()), (4.1, {"left of"}), (30.0, {"left of"})])
def test_position_margin_is_relative_to_box_sizes(d, expected):
    # two 10-px boxes, centres d apart on x: margin 0.1 * (10 + 10) = 2 px, the shrunk share
    # (d - 2) / d must exceed 0.5, i.e. d > 4
    a, b = det(0, 0, 10, 10), det(d, 0, d + 10, 10)
    assert R.relative_position(a, b) == expected
    assert R.relative_position(b, a) == {"right of" if r == "left of" else r for r in expected}


def test_position_diagonal_and_vertical():
    a, b = det(0, 0, 10, 10), det(40, 40, 50, 50)
    assert R.relative_position(a, b) == {"left of", "above"}
    assert R.relative_position(det(0, 60, 10, 70), det(0, 0, 10, 10)) == {"below"}


def test_position_rule_needs_every_object_against_every_target():
    meta = {"tag": "position", "prompt": "a photo of a dog right of a cat",
            "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    cat, dog_right, dog_left = det(0, 0, 10, 10), det(50, 0, 60, 10), det(0, 0, 10, 10, 0.99)
    assert R.judge({"cat": [cat], "dog": [dog_right]}, meta, no_colours).correct
    v = R.judge({"cat": [cat], "dog": [dog_left]}, meta, no_colours)
    assert not v.correct and not v.strict
    # Flow-GRPO's partial credit: cat 1, dog count 1, failed position 0 and then 1 -> 3/4
    assert v.score == pytest.approx(0.75)
    # a second, less confident dog on the wrong side: GenEval looks at the top-1 dog only; the
    # partial credit counts both dogs (count term 0) and adds a 0 for the position
    v = R.judge({"cat": [cat], "dog": [dog_right, det(0, 30, 10, 40, 0.5)]}, meta, no_colours)
    assert v.correct and not v.strict and v.score == pytest.approx((1 + 0 + 0) / 3)
    v = R.judge({"dog": [dog_right]}, meta, no_colours)  # no target at all
    assert not v.correct and v.score == pytest.approx((0 + 1 + 0) / 3)


def test_colour_attribution():
    meta = {"tag": "color_attr", "prompt": "a photo of a red car and a blue bench",
            "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "blue"}]}
    car, bench = det(0, 0, 10, 10), det(30, 0, 40, 10)
    assert R.judge({"car": [car], "bench": [bench]}, meta, colours_of({id(car): "red", id(bench): "blue"})).correct
    swapped = colours_of({id(car): "blue", id(bench): "red"})
    v = R.judge({"car": [car], "bench": [bench]}, meta, swapped)
    assert not v.correct and not v.strict and v.score == pytest.approx(0.5)  # counts 1, 1; colours 0, 0
    calls = []

    def counting_calls(found, name):
        calls.append(name)
        return ["red"] * len(found)

    R.judge({"car": [car, det(50, 50, 60, 60, 0.8)], "bench": [bench]}, meta, counting_calls)
    assert sorted(calls) == ["bench", "car"]  # one classification per class, shared by both rules


def test_partial_credit_goes_negative_with_many_extras_as_in_flow_grpo():
    meta = {"tag": "single_object", "prompt": "a photo of a cat", "include": [{"class": "cat", "count": 1}]}
    v = R.judge({"cat": [det(10 * i, 0, 10 * i + 5, 5) for i in range(3)]}, meta, no_colours)
    assert v.correct and not v.strict and v.score == pytest.approx(-1.0)


def test_every_shipped_metadata_record_validates_and_looks_up():
    rows = prompt_sets.metadata("geneval/benchmark")
    assert len(rows) == 553 and {r["tag"] for r in rows} == set(R.TAGS)
    for i, r in enumerate(rows):
        R.check_metadata(r, f"line {i}")
    index = R.MetadataIndex()
    assert index[rows[7]["prompt"]] == rows[7]
    with pytest.raises(ValueError, match="no metadata for prompt 'a purple unicorn'"):
        index["a purple unicorn"]
    with pytest.raises(ValueError, match="tag must be one of"):
        R.check_metadata({"prompt": "x", "tag": "nope"})
    classes = {req["class"] for r in rows for req in r.get("include", [])}
    assert classes <= set(prompt_sets.geneval_object_names())


def test_summary_in_genevals_layout():
    tags = ["single_object"] * 4 + ["counting"] * 4
    prompts = ["a"] * 4 + ["b", "b", "c", "c"]
    correct = [1, 1, 0, 0, 0, 0, 1, 0]
    s = R.summary(tags, prompts, correct)
    assert s["tasks"]["single_object"] == {"accuracy": 0.5, "correct": 2, "images": 4}
    assert s["tasks"]["counting"]["accuracy"] == 0.25 and s["overall"] == pytest.approx(0.375)
    assert s["correct_prompts"] == pytest.approx(2 / 3)
    text = R.format_summary(s)
    assert "single_object    = 50.00% (2 / 4)" in text and "Overall score (avg. over tasks): 0.37500" in text
    assert text.splitlines()[:3] == ["Summary", "=======", "Total images: 8"]


# ---- the model layer on tiny random checkpoints ------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffalign.rewards.testing import save_tiny_geneval

    return save_tiny_geneval(tmp_path_factory.mktemp("geneval"))


def _force_class(reward, name, logit=30.0):
    """Make the random detector call every query ``name`` with probability ~1."""
    head = reward.detector.model.class_predictor
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-logit)
        head.bias[reward.detector.class_names.index(name)] = logit


def test_model_layer_runs_end_to_end_on_tiny_checkpoints(tiny, tmp_path):
    extra = tmp_path / "extra.jsonl"  # metadata from a user's JSONL file beside the shipped set
    extra.write_text(json.dumps({"tag": "color_attr", "prompt": "a photo of a red car and a blue bench", "include": [
        {"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "blue"}]}) + "\n")
    r = rewards.get("geneval", path=tiny, mode="correct", metadata=["geneval/benchmark", str(extra)])
    assert r.name == "geneval_correct" and not r.differentiable
    prompts = ["a photo of a bench", "a photo of a red car and a blue bench"]
    images = torch.rand(2, 3, 48, 40)
    meta = [{}, {}]
    out = r(images, prompts, meta)
    assert out.tolist() == [0.0, 0.0]  # random weights: no class gets probability > 0.3
    assert meta[0]["geneval"]["tag"] == "single_object" and meta[0]["geneval"]["counts"] == {}
    _force_class(r, "bench")
    dets = r.detector(images, min_score=0.3)
    assert set(dets[0]) == {"bench"} and len(dets[0]["bench"]) >= 1
    for d in dets[0]["bench"]:
        assert d.mask.shape == (48, 40) and d.mask.dtype == bool and 0.3 < d.score <= 1.0
        ys, xs = np.nonzero(d.mask)
        assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    n = len(dets[0]["bench"])
    out = r(images, prompts, meta)
    assert out[0] == float(n >= 1)  # GenEval: at least one bench
    assert meta[1]["geneval"]["counts"] == {"bench": min(16, len(dets[1]["bench"]))}  # at most 16 per class
    assert not meta[1]["geneval"]["correct"] and "car>=1" in meta[1]["geneval"]["reasons"][0]


def test_detector_scores_are_class_probability_times_mask_score(tiny):
    r = rewards.get("geneval", path=tiny)
    _force_class(r, "cat", logit=2.0)
    images = torch.rand(1, 3, 64, 64)
    det_model = r.detector
    x, pm, _ = det_model._inputs(images)
    with torch.no_grad():
        out = det_model.model(pixel_values=x, pixel_mask=pm)
    p = out.class_queries_logits.softmax(-1)[0, :, det_model.class_names.index("cat")]
    logits = torch.nn.functional.interpolate(out.masks_queries_logits, size=(64, 64), mode="bilinear")[0]
    binary = logits > 0
    ms = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    expected = sorted((p * ms).tolist(), reverse=True)
    got = [d.score for d in det_model(images, min_score=0.0)[0]["cat"]]
    assert got == pytest.approx(expected[:len(got)], abs=1e-5) and len(got) == len(expected)


def test_colour_classifier_uses_grey_background_and_box(tiny):
    r = rewards.get("geneval", path=tiny)
    image = torch.rand(3, 32, 32)
    mask = np.zeros((32, 32), bool)
    mask[4:20, 8:24] = True
    d = Detection((8, 4, 24, 20), 0.9, mask)
    got = r.colors(image, [d, d], "car")
    assert len(got) == 2 and got[0] == got[1] and got[0] in R.COLORS
    # pixels outside the mask do not matter: the crop is grey there
    other = image.clone()
    other[:, 0:4] = 0.0
    other[:, 25:] = 1.0
    assert r.colors(other, [d], "car") == got[:1]


def test_partial_and_strict_modes_and_errors(tiny):
    partial, strict = rewards.get("geneval", path=tiny), rewards.get("geneval", path=tiny, mode="strict")
    images = torch.rand(1, 3, 32, 32)
    for rw in (partial, strict):
        _force_class(rw, "bench")
    n = min(16, len(partial.detector(images, min_score=0.3)[0]["bench"]))
    assert partial(images, ["a photo of a bench"]).item() == pytest.approx(1 - abs(1 - n))
    assert strict(images, ["a photo of a bench"]).item() == float(n == 1)
    with pytest.raises(ValueError, match="no metadata for prompt"):
        partial(images, ["a cat on the moon"])
    with pytest.raises(ValueError, match="mode must be one of"):
        rewards.get("geneval", path=tiny, mode="soft")
    with pytest.raises(FileNotFoundError, match="mask2former"):
        rewards.get("geneval", path=tiny / "clip")


def test_cli_eval_benchmark_geneval_prints_the_task_table(tiny, tmp_path):
    from tiny_pipelines import build_sd
    from typer.testing import CliRunner

    from diffalign.cli import app

    pipe = build_sd(tmp_path / "sd")  # a tiny random diffusers pipeline that takes any prompt
    args = ["eval", "--model", f"base={pipe}", "--benchmark", "geneval", "--benchmark-path", str(tiny),
            "--num-prompts", "12", "-k", "2", "--steps", "2", "--grid-prompts", "0", "--device", "cpu",
            "--out", str(tmp_path / "ev")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "== GenEval: base ==" in res.output and "Task breakdown" in res.output
    assert "Total images: 24" in res.output and "Total prompts: 12" in res.output
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    s = saved["benchmark"]["summaries"]["base"]
    assert s["images"] == 24 and sum(r["images"] for r in s["tasks"].values()) == 24
    assert len(saved["models"]["base"]["scores"]["geneval_correct"]) == 24
    res = CliRunner().invoke(app, args[:5] + ["--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--benchmark-path" in res.output


def test_rules_agree_with_known_content_on_rendered_scenes():
    """benchmarks/geneval_agreement.py: every GenEval prompt drawn faithfully passes, every
    corruption that breaks it fails, corruptions that should not matter do not (rule layer and
    mask -> box path; the detector and CLIP need real weights)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "geneval_agreement.py"
    spec = importlib.util.spec_from_file_location("geneval_agreement", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    classes = prompt_sets.geneval_object_names()
    seen, wrong = set(), []
    for meta in prompt_sets.metadata("geneval/benchmark"):
        for name, objs, expected in mod.variants(meta, mod.scene(meta, rng), rng, classes):
            image, masks = mod.render(objs, 64, rng)
            v = R.judge(mod.detections(objs, masks), meta, mod.colour_of(image))
            seen.add(name)
            if v.correct != expected:
                wrong.append((meta["prompt"], name, v.reasons))
    assert not wrong, wrong[:5]
    assert seen == {"faithful", "drop one", "recolour", "one extra", "extra at score 0.5", "swapped",
                    "unrelated object"}
