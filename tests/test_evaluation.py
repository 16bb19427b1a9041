"""evaluation/: metrics, evaluate(), tables, persistence and the `diffalign eval` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from diffalign.evaluation import (evaluate, fid_kid, format_table, load_eval, make_grid, paired_drift, reward_stats,
                                  save_eval, win_rate, within_prompt_diversity)
from diffalign.models.shapes_unet import ShapesDenoiser, default_config
from diffalign.worlds import shapes

PROMPTS = ["one red circle", "two blue squares", "a red circle left of a blue square"]
K = 3
STEPS = 3


class Reward:
    """A tiny reward object with the registry's contract (name, differentiable, __call__)."""

    differentiable = False

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, images, prompts, meta=None):
        return self.fn(images, prompts)


def brightness(x, p):
    return x.mean(dim=(1, 2, 3))


def redness(x, p):
    return x[:, 0].mean(dim=(1, 2)) - x[:, 1:].mean(dim=(1, 2, 3))


def verifier(x, p):
    return torch.as_tensor(shapes.verify(x, p).score)


REWARDS = [Reward("verifier", verifier), Reward("brightness", brightness), Reward("redness", redness)]


def tiny_model(seed: int) -> ShapesDenoiser:
    """A small random shapes model. Its output layers are zero-initialised (it would predict 0
    and ignore the prompt), so every weight is jittered from a fixed seed."""
    torch.manual_seed(seed)
    cfg = default_config("flow", list(shapes.VOCAB))
    cfg.channels = (16, 16, 16)
    model = ShapesDenoiser(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def run_eval(models, **kw):
    kw = {"seeds_per_prompt": K, "rewards": REWARDS, "target": "verifier", "num_steps": STEPS, "base": "base",
          "guidance_scale": 1.0, "sampler": "flow_ode", **kw}
    return evaluate(models, PROMPTS, **kw)


@pytest.fixture(scope="module")
def models():
    return tiny_model(0), tiny_model(1)


@pytest.fixture(scope="module")
def result(models, tmp_path_factory):
    m0, m1 = models
    out = tmp_path_factory.mktemp("eval")
    res = run_eval({"base": m0, "same": m0, "other": m1}, out_dir=out)
    return res, out


# ---------------------------------------------------------------------------------- metrics


def test_diversity_is_zero_for_identical_samples_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    one = torch.rand(2, 1, 3, 32, 32, generator=g)
    same = one.expand(2, 4, 3, 32, 32).reshape(8, 3, 32, 32)
    assert within_prompt_diversity(same, 2, 4) == 0.0
    different = torch.rand(8, 3, 32, 32, generator=g)
    assert within_prompt_diversity(different, 2, 4) > 0.01
    assert within_prompt_diversity(different, 8, 1) is None  # one sample per prompt: undefined


def test_diversity_is_the_rms_distance_of_pooled_pixels():
    a = torch.zeros(1, 3, 32, 32)
    b = torch.full((1, 3, 32, 32), 0.5)
    assert within_prompt_diversity(torch.cat([a, b]), 1, 2) == pytest.approx(0.5)
    assert paired_drift(a, b) == pytest.approx(0.5)
    assert paired_drift(a, a) == 0.0


def test_reward_stats_definitions():
    s = reward_stats(np.array([1.0, 2.0, 3.0, 4.0]), num_prompts=2, per_prompt=2)  # prompts [1,2], [3,4]
    assert s["mean"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s["stderr"] == pytest.approx(np.std([1.5, 3.5], ddof=1) / math.sqrt(2))  # prompts as units
    assert s["seed_block_std"] == pytest.approx(np.std([2.0, 3.0], ddof=1))  # blocks [1,3], [2,4]


def test_win_rate_counts_ties_half():
    assert win_rate(np.array([2.0, 2.0, 5.0]), np.array([1.0, 2.0, 4.0])) == pytest.approx(2.5 / 3)
    assert win_rate(np.array([0.0, 0.0]), np.array([1.0, 1.0])) == 0.0


def test_fid_kid_zero_on_identical_sets_and_positive_on_different_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 32, 32, generator=g)
    same = fid_kid(x, x)
    assert same["fid"] < 1e-6 and abs(same["kid"]) < 1e-3
    darker = fid_kid(x * 0.5, x)
    assert darker["fid"] > 0.1 and darker["kid"] > 0.01
    assert fid_kid(x * 0.5, x) == darker  # KID's subsets come from a fixed seed
    assert fid_kid(x[:1], x[:1])["fid"] is None


# -------------------------------------------------------------------------------- evaluate


def test_evaluate_is_deterministic_and_independent_of_model_order(models, result):
    res, _ = result
    m0, m1 = models
    again = run_eval({"other": m1, "base": m0})
    for label in ("base", "other"):
        for name in ("verifier", "brightness", "redness"):
            assert again["models"][label]["rewards"][name] == res["models"][label]["rewards"][name]
        assert again["models"][label]["diversity"] == res["models"][label]["diversity"]
    assert again["models"]["other"]["vs_base"]["fid"] == res["models"]["other"]["vs_base"]["fid"]


def test_model_against_itself_wins_half_and_does_not_drift(result):
    res, _ = result
    same, other = res["models"]["same"]["vs_base"], res["models"]["other"]["vs_base"]
    assert same["win_rate"] == {"verifier": 0.5, "brightness": 0.5, "redness": 0.5}
    assert same["drift"] == 0.0 and same["fid"] < 1e-6
    assert other["drift"] > 0.01 and other["fid"] > 0  # a different model does drift
    assert other["win_rate"]["brightness"] != 0.5
    assert res["models"]["base"]["vs_base"] is None


def test_result_layout(result):
    res, out = result
    assert res["target"] == "verifier" and res["heldout"] == ["brightness", "redness"]
    assert res["prompts"] == PROMPTS and res["seeds_per_prompt"] == K
    m = res["models"]["other"]
    assert set(m["rewards"]["brightness"]) == {"mean", "std", "stderr", "seed_block_std"}
    assert m["diversity"] > 0
    assert m["stability"] == m["rewards"]["verifier"]["seed_block_std"]
    assert res["shapes_world"] and set(m["shapes"]["accuracy"]) >= {"one", "two", "count", "relation", "overall"}
    assert 0 <= m["shapes"]["verifier_score"] <= 1
    assert m["shapes"]["verifier_score"] == pytest.approx(m["rewards"]["verifier"]["mean"])
    json.dumps(res, allow_nan=False)  # JSON-able


def test_grids_are_written_per_model(result):
    from PIL import Image

    res, out = result
    for label in ("base", "same", "other"):
        assert res["models"][label]["grid"] == f"images_{label}.png"
        img = Image.open(out / f"images_{label}.png")
        assert img.width > K * 96 and img.height >= len(PROMPTS) * 96  # K columns + label margin, P rows


def test_save_and_load_round_trip(result, tmp_path):
    res, _ = result
    path = save_eval(res, tmp_path / "sub" / "eval.json")
    assert load_eval(path) == json.loads(json.dumps(res))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="models"):
        load_eval(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_eval(tmp_path / "nope.json")


def test_format_table_lists_models_and_marks_target_and_heldout(result):
    text = format_table(result[0])
    for s in ("verifier (target)", "brightness (held-out)", "base (base)", "other", "FID", "acc relation",
              "Win rate"):
        assert s in text, s


def test_non_shapes_prompts_skip_the_verifier(models):
    res = evaluate({"m": models[0]}, ["red", "blue circle"], seeds_per_prompt=2, rewards=[REWARDS[1]],
                   num_steps=2, sampler="flow_ode", guidance_scale=1.0)
    assert res["shapes_world"] is False and res["models"]["m"]["shapes"] is None
    assert res["target"] is None and res["models"]["m"]["stability"] is None


@pytest.mark.parametrize("kw, match", [
    ({"seeds_per_prompt": 0}, "seeds_per_prompt must be an int >= 1, got 0"),
    ({"base": "nope"}, r"base 'nope' is not a model label; allowed: \['base'\]"),
    ({"target": "nope"}, r"target 'nope' is not one of the rewards"),
])
def test_evaluate_rejects_bad_input(models, kw, match):
    with pytest.raises(ValueError, match=match):
        run_eval({"base": models[0]}, **kw)


def test_evaluate_rejects_unsafe_labels(models):
    with pytest.raises(ValueError, match="label '../x'"):
        run_eval({"../x": models[0]}, base=None)


def test_make_grid_checks_labels():
    x = torch.rand(6, 3, 8, 8)
    img = make_grid(x, 3, row_labels=["a", "b"], marks=[True, False, None] * 2)
    assert img.size[0] > 3 * 96 and img.size[1] > 2 * 96
    with pytest.raises(ValueError, match="3 row labels for 2 rows"):
        make_grid(x, 3, row_labels=["a", "b", "c"])


# -------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_model(0).save_pretrained(d)
    return d


def cli_app():
    from diffalign.commands import evaluate as cmd

    app = typer.Typer()
    cmd.register(app)
    return app


@pytest.fixture
def fake_registry(monkeypatch):
    """The CLI resolves reward names through diffalign.rewards.get_many; point it at our rewards."""
    import diffalign.rewards as registry

    by_name = {r.name: r for r in REWARDS}
    monkeypatch.setattr(registry, "get_many", lambda spec: [by_name[n] for n in spec.split(",")], raising=False)


def test_cli_eval_end_to_end(saved_model, tmp_path, fake_registry):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes prompts\none red circle\n\ntwo blue squares\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli_app(), [
        "eval", "--model", f"base={saved_model}", "--model", f"tuned={saved_model}", "--prompts", str(prompts),
        "-k", "2", "--reward", "verifier,brightness", "--target", "verifier", "--base", "base",
        "--sampler", "flow_ode", "--steps", "2", "--guidance", "1.0", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_eval(out / "eval.json")
    assert result["prompts"] == ["one red circle", "two blue squares"]
    assert result["sources"] == {"base": str(saved_model), "tuned": str(saved_model)}
    assert result["models"]["tuned"]["vs_base"]["win_rate"]["brightness"] == 0.5
    assert (out / "images_base.png").is_file() and (out / "images_tuned.png").is_file()
    assert "verifier (target)" in res.output and "brightness (held-out)" in res.output


@pytest.mark.parametrize("args, message", [
    (["--prompts", "MISSING"], "prompts file not found: MISSING"),
    (["-k", "0"], "--seeds-per-prompt must be >= 1, got 0"),
    (["--base", "nope"], "--base 'nope' is not a --model label; labels: base"),
    (["--target", "nope"], "--target 'nope' is not one of the --reward names: verifier"),
    (["--split", "test"], "--split must be one of heldout, train, got 'test'"),
])
def test_cli_eval_errors_are_clear(saved_model, tmp_path, fake_registry, args, message):
    args = [a.replace("MISSING", str(tmp_path / "missing.txt")) for a in args]
    message = message.replace("MISSING", str(tmp_path / "missing.txt"))
    res = CliRunner().invoke(cli_app(), ["eval", "--model", f"base={saved_model}", "--reward", "verifier",
                                         "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())


def test_cli_eval_rejects_malformed_model_option(tmp_path, fake_registry):
    res = CliRunner().invoke(cli_app(), ["eval", "--model", "shapes-flow", "--reward", "verifier",
                                         "--out", str(tmp_path)])
    assert res.exit_code == 2 and "LABEL=NAME_OR_DIR" in res.output


@pytest.mark.slow
def test_cli_eval_with_the_reward_registry(saved_model, tmp_path):
    import diffalign.rewards as registry

    if not hasattr(registry, "get_many"):
        pytest.skip("diffalign.rewards has no get_many yet (the registry is written in another issue)")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one red circle\nthree green triangles\n")
    out = subprocess.run([sys.executable, "-m", "diffalign", "eval", "--model", f"base={saved_model}", "--prompts",
                          str(prompts), "-k", "2", "--reward", "shapes,brightness", "--target", "shapes",
                          "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = load_eval(tmp_path / "out" / "eval.json")
    assert result["heldout"] == ["brightness"] and result["shapes_world"]


def test_a_model_of_another_schedule_family_samples_with_its_own_defaults(models):
    """A VP model beside a flow base: with no sampler given it samples with its own (DDIM), the
    shared step count and guidance still apply, and each entry records its settings; a sampler
    given explicitly is shared and refused where it does not fit."""
    torch.manual_seed(0)
    cfg = default_config("epsilon", list(shapes.VOCAB))
    cfg.channels = (16, 16, 16)
    vp = ShapesDenoiser(cfg).eval()
    kw = {"seeds_per_prompt": 2, "rewards": [REWARDS[1]], "num_steps": STEPS, "guidance_scale": 1.0}
    res = evaluate({"flow": models[0], "vp": vp}, PROMPTS, **kw)
    assert res["models"]["flow"]["sampling"]["sampler"] == "flow_ode"
    assert res["models"]["vp"]["sampling"]["sampler"] == "ddim"
    assert res["models"]["vp"]["sampling"]["num_steps"] == STEPS and res["models"]["vp"]["sampling"]["guidance_scale"] == 1.0
    alone = evaluate({"vp": vp}, PROMPTS, **kw)  # the same images as when it is evaluated alone
    assert res["models"]["vp"]["rewards"]["brightness"] == alone["models"]["vp"]["rewards"]["brightness"]
    with pytest.raises(ValueError, match="needs a flow schedule"):
        evaluate({"flow": models[0], "vp": vp}, PROMPTS, sampler="flow_ode", **kw)
