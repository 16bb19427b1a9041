"""Spatial relations in the shapes world: the relation breakdown, the pretraining time distribution,
the learnability benchmark, and the shipped models' text conditioning and held-out profile."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.models.shapes_unet import ShapesDenoiser, default_config
from diffalign.runtime.pretrain import PretrainConfig, sample_t
from diffalign.worlds import shapes

ROOT = Path(__file__).resolve().parents[1]


def test_breakdown_separates_objects_from_placement():
    prompts = ["a red circle left of a blue square", "a green square right of a yellow circle"] * 4
    images, _ = shapes.render_batch(prompts, seed=3)
    res = shapes.verify(images, prompts)
    assert shapes.breakdown(prompts, res) == {"n_count": 0, "n_relation": 8, "both_right": 1.0, "relation": 1.0,
                                              "n_both": 8, "relation_given_both": 1.0, "swapped_given_both": 0.0}
    # mirrored left-right (upward triangles stay upward): the same two objects, on the wrong sides
    mirrored = images[:, :, ::-1].copy()
    parts = shapes.breakdown(prompts, shapes.verify(mirrored, prompts))
    assert parts["both_right"] == 1.0 and parts["relation_given_both"] == 0.0 and parts["relation"] == 0.0
    assert parts["swapped_given_both"] == 1.0  # the right axis, the objects in the reversed order
    # half the images blank: both_right halves, the relation given both is still judged on the others
    mixed = np.concatenate([images[:4], np.full_like(images[4:], 255)])
    parts = shapes.breakdown(prompts, shapes.verify(mixed, prompts))
    assert parts["both_right"] == 0.5 and parts["relation_given_both"] == 1.0 and parts["n_both"] == 4
    assert "relation_given_both" not in shapes.breakdown(prompts, shapes.verify(np.full_like(images, 255), prompts))
    with pytest.raises(ValueError, match="got 1 prompts but 8 results"):
        shapes.breakdown(prompts[:1], res)


def test_breakdown_colour_of_count_prompts():
    prompts = ["two red circles", "one blue square", "three green triangles"]
    images, _ = shapes.render_batch(prompts, seed=1)
    wrong = images.copy()
    wrong[1][(wrong[1] == shapes.PALETTE["blue"]).all(-1)] = shapes.PALETTE["purple"]  # the square turns purple
    wrong[2] = 255  # nothing drawn: no colour to be right
    assert shapes.breakdown(prompts, shapes.verify(images, prompts))["colour"] == 1.0
    parts = shapes.breakdown(prompts, shapes.verify(wrong, prompts))
    assert parts["colour"] == pytest.approx(1 / 3) and parts["n_count"] == 3 and "both_right" not in parts


@pytest.mark.parametrize("variant", ["flow", "vp"])
def test_sample_t_puts_the_requested_share_at_high_noise(variant):
    model = ShapesDenoiser(default_config("flow" if variant == "flow" else "epsilon", list(shapes.VOCAB)))
    g = torch.Generator().manual_seed(0)
    base = sample_t(PretrainConfig(model=variant, t_high_fraction=0.0), model, 20000, g)
    mixed = sample_t(PretrainConfig(model=variant, t_high_fraction=0.5, t_high_min=0.7), model, 20000, g)
    assert base.min() > 0 and base.max() <= 1 and mixed.min() > 0 and mixed.max() <= 1
    p_base, p_mixed = (base >= 0.7).float().mean().item(), (mixed >= 0.7).float().mean().item()
    assert abs(p_mixed - (0.5 + 0.5 * p_base)) < 0.02  # half drawn from [0.7, 1], half from the base draw
    if variant == "flow":
        assert abs(p_base - 0.199) < 0.02  # logit-normal(0, 1): P(t >= 0.7) = P(z >= logit 0.7 = 0.847)
        shifted = sample_t(PretrainConfig(t_logit_mean=1.0, t_high_fraction=0.0), model, 20000, g)
        assert abs((shifted >= 0.7).float().mean().item() - 0.561) < 0.02  # P(1 + z >= 0.847)
    else:  # the VP draw stays on the discrete training steps
        k = mixed * model.schedule.num_train_timesteps - 1
        assert torch.allclose(k, k.round(), atol=1e-3)


@pytest.mark.parametrize("override,message", [
    (dict(t_high_fraction=1.5), "t_high_fraction"),
    (dict(t_high_min=1.0), "t_high_min"),
    (dict(t_logit_std=0.0), "t_logit_std"),
    (dict(text_pos_std=-1.0), "text_pos_std"),
    (dict(model="vp", t_logit_mean=1.0), "apply to model 'flow' only"),
    (dict(weights="last"), "weights"),
    (dict(guidance_scale=0.0), "guidance_scale"),
])
def test_pretrain_config_rejects_bad_time_fields(override, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**override)


@pytest.mark.slow
def test_learnability_benchmark_runs_and_writes_its_curves(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import learnability

    learnability.main(["--recipes", "pos_high", "--steps", "2", "--eval-every", "1", "--relation-prompts", "3",
                       "--count-seeds", "1", "--splits", "heldout", "--set", "batch_size=4", "--out", str(tmp_path)])
    import json

    rows = [json.loads(line) for line in (tmp_path / "curves.jsonl").read_text().splitlines()]
    got = [(r["recipe"], r["step"], r["split"]) for r in rows]
    assert got == [("pos_high", 1, "heldout"), ("pos_high", 2, "heldout")]
    for r in rows:  # the twins' figures are NaN when no pair of images holds both objects (a 2-step model)
        assert all(0 <= r[k] <= 1 for k in learnability.METRICS if not (k.startswith("swap_") and np.isnan(r[k])))
    assert "relation|both" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown recipe"):
        learnability.main(["--recipes", "nope", "--out", str(tmp_path)])


@pytest.mark.slow
def test_methods_benchmark_trains_evaluates_and_tabulates(tmp_path):
    from test_online_rl import tiny_model

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_methods

    tiny_model("flow").save_pretrained(tmp_path / "tiny")
    bench_methods.main(["--methods", "diffusion_nft", "--minutes", "0.01", "--prompts", "4", "--seeds", "2",
                        "--set", f"model={tmp_path / 'tiny'}", "--set", "algorithm.batch_size=8",
                        "--set", "algorithm.group_size=4", "--set", "algorithm.num_steps=2", "--threads", "1",
                        "--out", str(tmp_path / "out")])
    import json

    res = json.loads((tmp_path / "out" / "methods.json").read_text())["diffusion_nft"]
    assert res["images"] >= 8 and res["config"] == "configs/nft_shapes.yaml"
    assert set(res["eval"]) == {"base", "tuned"} and "n_relation" in res["eval"]["tuned"]["shapes"]["breakdown"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| diffusion_nft |" in table and "| base (" in table
    with pytest.raises(SystemExit, match="unknown method"):
        bench_methods.main(["--methods", "nope", "--out", str(tmp_path / "o2")])


def test_evaluation_tables_show_the_breakdown():
    from test_online_rl import tiny_model

    from diffalign import rewards
    from diffalign.evaluation import evaluate, format_table

    prompts = ["two red circles", "a blue square left of a green triangle"]
    res = evaluate({"m": tiny_model("flow")}, prompts, seeds_per_prompt=2, rewards=[rewards.get("shapes")],
                   num_steps=2)
    parts = res["models"]["m"]["shapes"]["breakdown"]
    assert parts["n_count"] == 2 and parts["n_relation"] == 2
    table = format_table(res)
    assert "colour right" in table and "both objects right" in table


def test_sequence_pool_starts_as_a_no_op_and_sees_word_order(tmp_path):
    from test_online_rl import tiny_model

    from diffalign.runtime.pretrain import init_model

    src = tiny_model("flow")
    src.save_pretrained(tmp_path / "src")
    model = init_model(PretrainConfig(init_from=str(tmp_path / "src"), sequence_pool=True)).eval()
    assert model.config.sequence_pool and not src.config.sequence_pool
    prompts = ["a red circle left of a blue square", "a blue square left of a red circle"]
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.full((2,), 0.9)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, model.encode_prompts(prompts)), src(x, t, src.encode_prompts(prompts)))
        torch.nn.init.normal_(model.unet.seq_pool.weight, std=0.1)
        pooled = model.unet.seq_pool((model.encode_prompts(prompts).tokens).flatten(1))
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3  # the same words in another order pool differently
    with pytest.raises(ValueError, match="is a 'flow' model; model='vp' needs 'epsilon'"):
        init_model(PretrainConfig(model="vp", init_from=str(tmp_path / "src")))


def test_role_embeddings_mark_the_two_objects_and_start_as_a_no_op(tmp_path):
    from test_online_rl import tiny_model

    from diffalign.models.shapes_unet import Tokenizer
    from diffalign.runtime.pretrain import init_model

    tok = Tokenizer(list(shapes.VOCAB), 10, list(shapes.RELATION_WORDS))
    roles = tok.roles(["a red circle left of a blue square", "a red circle above a blue square", "two red circles", ""])
    assert roles.tolist() == [[1, 1, 1, 0, 0, 2, 2, 2, 0, 0], [1, 1, 1, 0, 2, 2, 2, 0, 0, 0],
                              [1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0] * 10]
    with pytest.raises(ValueError, match=r"role_words \['beside'\] are not in the vocabulary"):
        Tokenizer(list(shapes.VOCAB), 10, ["beside"])
    # layout order: role 1 is the object that goes left / up, so "right of" and "below" exchange the roles
    layout = Tokenizer(list(shapes.VOCAB), 10, list(shapes.RELATION_WORDS), list(shapes.SECOND_FIRST_WORDS))
    roles = layout.roles(["a red circle left of a blue square", "a red circle right of a blue square",
                          "a red circle below a blue square", "two red circles"])
    assert roles.tolist() == [[1, 1, 1, 0, 0, 2, 2, 2, 0, 0], [2, 2, 2, 0, 0, 1, 1, 1, 0, 0],
                              [2, 2, 2, 0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="role_swap_words"):
        default_config("flow", list(shapes.VOCAB)).__class__(vocab=list(shapes.VOCAB), role_words=["left"],
                                                             role_swap_words=["below"])
    assert init_model(PretrainConfig(text_roles=True, text_role_order="layout")).config.role_swap_words == \
        list(shapes.SECOND_FIRST_WORDS)
    with pytest.raises(ValueError, match="text_role_order"):
        PretrainConfig(text_role_order="alphabetical")
    # the UNet's attention position embeddings at the scale asked (v2: 0.02)
    wide, narrow = init_model(PretrainConfig(attn_pos_std=1.0)).unet, init_model(PretrainConfig()).unet
    assert 0.8 < float(wide.attn2.pos.detach().std()) < 1.2 and float(narrow.attn2.pos.detach().std()) < 0.05
    with pytest.raises(ValueError, match="attn_pos_std"):
        PretrainConfig(attn_pos_std=0.0)

    src = tiny_model("flow")
    src.save_pretrained(tmp_path / "src")
    model = init_model(PretrainConfig(init_from=str(tmp_path / "src"), text_roles=True)).eval()
    assert model.config.role_words == list(shapes.RELATION_WORDS) and not src.config.role_words
    prompts = ["a red circle left of a blue square", "a blue square left of a red circle"]
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.full((2,), 0.9)
    with torch.no_grad():  # zero-initialised: the continued model starts where its source was
        torch.testing.assert_close(model(x, t, model.encode_prompts(prompts)), src(x, t, src.encode_prompts(prompts)))
        model.text_encoder.role.weight[1:].normal_(std=1.0)
        cond = model.encode_prompts(prompts)
    cos = torch.nn.functional.cosine_similarity
    # "red circle" as the first object vs as the second: far apart once the roles carry weight
    assert 1 - cos(cond.tokens[0, 1:3].flatten(), cond.tokens[1, 6:8].flatten(), dim=0) > 0.2
    model.save_pretrained(tmp_path / "roles")
    back = ShapesDenoiser.from_pretrained(tmp_path / "roles")
    assert back.config.role_words == model.config.role_words
    torch.testing.assert_close(back.encode_prompts(prompts).tokens, cond.tokens)
    with pytest.raises(ValueError, match="has role embeddings; set text_roles: true"):
        init_model(PretrainConfig(init_from=str(tmp_path / "roles")))
    with pytest.raises(ValueError, match="numbers its roles in mention order; set text_role_order: mention"):
        init_model(PretrainConfig(init_from=str(tmp_path / "roles"), text_roles=True, text_role_order="layout"))
    with pytest.raises(ValueError, match="text_role_std"):
        PretrainConfig(text_role_std=-1.0)


def test_swap_test_tells_an_order_blind_model_from_one_that_binds(monkeypatch):
    from diffalign.worlds import shapes_metrics

    prompts = shapes.sample_prompts(12, "heldout", seed=3, kinds=("relation",)) + ["two red circles"]

    class Fake(torch.nn.Module):  # "draws" renders; blind: both twins get the render of the sorted-first twin
        def __init__(self, blind):
            super().__init__()
            self.blind, self.sampling_defaults = blind, {}

    def fake_generate(model, ps, seeds, **_):
        drawn = [min(p, shapes.swapped(p)) if model.blind else p for p in ps]
        return torch.from_numpy(np.stack([shapes.render_batch([p], seed=s)[0][0] for p, s in zip(drawn, seeds)])
                                ).permute(0, 3, 1, 2).float() / 255

    monkeypatch.setattr(shapes_metrics, "generate", fake_generate)
    binds = shapes_metrics.swap_test(Fake(False), prompts, list(range(len(prompts))))
    blind = shapes_metrics.swap_test(Fake(True), prompts, list(range(len(prompts))))
    assert binds["n"] == blind["n"] == 12  # the count prompt is skipped
    assert binds["both"] == 1.0 and binds["one"] == 0.0
    assert blind["both"] == 0.0 and blind["one"] == 1.0 and blind["same_place"] == 1.0
    with pytest.raises(ValueError, match="at least one relation prompt"):
        shapes_metrics.swap_test(Fake(True), ["two red circles"], [0])


# The order check. Measured on the shipped models (64 training-split relation prompts, seed 1): per-object gap
# 0.655 (flow) / 0.677 (vp), pooled 9.4e-4 / 9.4e-4. Their stage 1 (the v2 models, which drew the same image for a
# prompt and its swapped twin): 0.130 / 0.124 per object, pooled 0.0029 / 0.0027. The v1 models': 1.8e-4 / 2.8e-4
# per object, pooled 6.9e-6 / 1.1e-5 ("A left of B" and "B left of A" one part in 10^5 apart). The per-object
# threshold sits between stage 1 and the shipped models; the pooled one between v1 and the shipped models.
ORDER_GAP_OBJECT, ORDER_GAP_POOLED = 0.3, 2e-4


@pytest.mark.parametrize("name", ["shapes-flow", "shapes-vp"])
def test_shipped_models_encode_swapped_prompts_apart(name):
    from diffalign.models import load_model
    from diffalign.worlds.shapes_metrics import order_gap

    model = load_model(name)
    gap = order_gap(model, shapes.sample_prompts(64, "train", seed=1, kinds=("relation",)))
    assert gap["object"] > ORDER_GAP_OBJECT and gap["pooled"] > ORDER_GAP_POOLED, gap
    with pytest.raises(ValueError, match="at least one relation prompt"):
        order_gap(model, ["two red circles"])


# The bands of a real base model on GenEval (issue: shapes world v2); 200 held-out prompts x 2 seeds.
BANDS = {"one": (0.95, 1.0), "colour": (0.95, 1.0), "count": (0.40, 0.75), "relation": (0.20, 0.50),
         "relation_given_both": (0.50, 1.0), "overall": (0.25, 0.65)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shapes-flow", "shapes-vp"])
def test_shipped_weights_have_a_base_model_profile(name):
    from diffalign.models import load_model
    from diffalign.worlds.shapes_metrics import profile, swap_test

    model = load_model(name)
    prompts = [p for p in shapes.sample_prompts(200, "heldout", seed=2024) for _ in range(2)]
    got = profile(model, prompts, list(range(len(prompts))), batch=200)
    assert got["n_count"] == got["n_relation"] == 200
    outside = {k: round(got[k], 3) for k, (lo, hi) in BANDS.items() if not lo <= got[k] <= hi}
    assert not outside, f"{name} outside the bands {BANDS}: {outside}"
    # twins from the same noise: stage 1 (the v2 models) drew both right in 0.004 of 246 pairs, the shipped
    # models 0.089 / 0.098 (flow / vp) of ~120: the order reaches the image
    twins = swap_test(model, shapes.sample_prompts(200, "heldout", seed=5, kinds=("relation",)), list(range(200)))
    assert twins["n"] >= 80 and twins["both"] > 0.03, twins


def test_pretrain_ships_the_weights_it_is_told_and_reads_a_config_file(tmp_path):
    from diffalign.config import save_config
    from diffalign.runtime.pretrain import pretrain

    cfg = PretrainConfig(model="flow", steps=3, batch_size=4, warmup=1, log_every=1, checkpoint_every=3,
                         weights="raw", guidance_scale=2.5)
    model = pretrain(cfg, tmp_path / "raw", progress=False)
    state = torch.load(tmp_path / "raw" / "checkpoint.pt", weights_only=False)
    loaded = ShapesDenoiser.from_pretrained(tmp_path / "raw")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    assert loaded.sampling_defaults["guidance_scale"] == 2.5 == model.config.guidance_scale
    pretrain(PretrainConfig(**{**cfg.__dict__, "weights": "ema"}), tmp_path / "ema", progress=False)
    ema = ShapesDenoiser.from_pretrained(tmp_path / "ema")
    key = next(k for k in state["ema"]["shadow"] if not torch.equal(state["ema"]["shadow"][k], state["model"][k]))
    assert torch.equal(ema.state_dict()[key], state["ema"]["shadow"][key])
    # re-exporting a finished run with other export fields resumes without --force
    save_config(PretrainConfig(**{**cfg.__dict__, "weights": "ema", "guidance_scale": 4.5}), tmp_path / "c.yaml")
    import subprocess

    out = subprocess.run([sys.executable, "-m", "diffalign", "pretrain", "--config", str(tmp_path / "c.yaml"),
                          "--out", str(tmp_path / "raw"), "--resume"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    again = ShapesDenoiser.from_pretrained(tmp_path / "raw")
    assert again.sampling_defaults["guidance_scale"] == 4.5
    assert torch.equal(again.state_dict()[key], ema.state_dict()[key])
    bad = subprocess.run([sys.executable, "-m", "diffalign", "pretrain", "--config", str(tmp_path / "nope.yaml"),
                          "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "config file not found" in bad.stderr


def test_relation_finetune_benchmark_runs_and_writes_its_curve(tmp_path):
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import relation_finetune

    rows = relation_finetune.main(["--epochs", "2", "--every", "1", "--prompts", "3", "--seeds", "1",
                                   "--out", str(tmp_path), "--set", "prompts.relation_fraction=1.0",
                                   "algorithm.batch_size=16", "algorithm.pretrain_weight=0"])
    assert [r["epoch"] for r in rows] == [0, 1, 2] and [r["images"] for r in rows] == [0, 16, 32]
    assert all(0 <= r["relation"] <= 1 and abs(3 * r["relation"] - round(3 * r["relation"])) < 1e-3 for r in rows)
    saved = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert saved == rows and (tmp_path / "run" / "checkpoints").is_dir()
    assert all(shapes.parse(p).kind == "relation" for p in relation_finetune.relation_prompts(5))


@pytest.mark.parametrize("variant", ["flow", "vp"])
def test_shipped_pretrain_configs_chain_stage_1_into_stage_2(variant, tmp_path, monkeypatch):
    """The two configs that reproduce a shipped base run in order: stage 1 from a random init, stage 2 with
    layout roles from stage 1's output (its ``init_from``), with the guidance the shipped weights carry."""
    from dataclasses import replace

    from diffalign.config import load_config
    from diffalign.models import load_model
    from diffalign.runtime.pretrain import pretrain

    one = load_config(PretrainConfig, ROOT / "configs" / "pretrain" / f"shapes-{variant}-stage1.yaml")
    two = load_config(PretrainConfig, ROOT / "configs" / "pretrain" / f"shapes-{variant}.yaml")
    assert one.model == two.model == variant and not one.init_from and not one.text_roles
    assert two.text_roles and two.text_role_order == "layout" and two.init_from == f"weights/shapes-{variant}-stage1"
    shipped = load_model(f"shapes-{variant}")
    assert shipped.config.guidance_scale == two.guidance_scale and shipped.config.role_words
    monkeypatch.chdir(tmp_path)  # init_from is relative to where the commands run
    pretrain(replace(one, steps=2, batch_size=4, checkpoint_every=2), Path(two.init_from), progress=False)
    model = pretrain(replace(two, steps=2, batch_size=4), tmp_path / "out", progress=False)
    assert model.config.role_swap_words == list(shapes.SECOND_FIRST_WORDS)
    back = ShapesDenoiser.from_pretrained(tmp_path / "out")
    assert back.config.role_words == list(shapes.RELATION_WORDS) and back.config.guidance_scale == two.guidance_scale


@pytest.mark.slow
def test_the_demo_config_teaches_held_out_relations_on_the_shipped_base(tmp_path):
    """The demo's method and settings (configs/demo.yaml) on relation prompts only, CI-sized: held-out
    relation accuracy of the shipped shapes-flow, same prompts and seeds before and after, rises well beyond
    its noise. Measured at lr 1e-4 (one thread, 3.2 min): 0.359 -> 0.469 -> 0.625 at 0 / 768 / 1536 images, 64 prompts
    (one standard error ~0.06); on the v2 base, which could not bind, the demo left relations at 0.435 -> 0.455."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import relation_finetune

    rows = relation_finetune.main(["--epochs", "12", "--every", "12", "--prompts", "64", "--seeds", "1",
                                   "--out", str(tmp_path), "--set", "prompts.relation_fraction=1.0",
                                   "algorithm.batch_size=128"])
    before, after = rows[0]["relation"], rows[-1]["relation"]
    assert rows[-1]["images"] == 1536 and after >= before + 0.15, rows
