"""The shapes-world models: persistence, name resolution, the shipped weights, pretraining."""

import json
import subprocess
import sys

import pytest
import torch

from diffalign.core import generate
from diffalign.models import WEIGHTS_DIR, load_model, resolve_model_path
from diffalign.models.shapes_unet import ShapesDenoiser, default_config
from diffalign.worlds import shapes


def tiny(kind="flow"):
    torch.manual_seed(0)
    cfg = default_config(kind, list(shapes.VOCAB))
    cfg.channels, cfg.text_dim, cfg.text_layers = (16, 16, 16), 16, 1
    m = ShapesDenoiser(cfg)
    torch.nn.init.normal_(m.unet.out.weight, std=0.05)
    return m.eval()


@pytest.mark.parametrize("kind", ["flow", "epsilon"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, kind):
    m = tiny(kind)
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "shapes-unet"
    m2 = load_model(tmp_path)
    assert m2.prediction_type == m.prediction_type and m2.schedule == m.schedule
    prompts = ["three blue squares", ""]
    a = generate(m, prompts, [1, 2], num_steps=3, guidance_scale=2.0, sampler=m.sampling_defaults["sampler"])
    b = generate(m2, prompts, [1, 2], num_steps=3, guidance_scale=2.0, sampler=m2.sampling_defaults["sampler"])
    assert torch.equal(a, b)


def test_vp_model_returns_epsilon_through_its_v_parametrisation():
    """shapes-vp: the UNet predicts v and the model returns eps = sigma x_t + alpha v, so the x0 that
    DDIM and DDPO derive from it stays finite where alpha(t) -> 0 (a direct epsilon UNet's does not)."""
    from diffalign.core.parametrization import to_x0_eps

    m = tiny("epsilon")
    assert m.config.output_parametrization == "v" and m.prediction_type == "epsilon"
    cond = m.encode_prompts(["two red circles", "one blue square"])
    x_t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1.0, 0.3])
    with torch.no_grad():
        eps, v = m(x_t, t, cond), m.unet(x_t, t, cond)
    alpha, sigma = m.schedule.alpha_sigma(t.double())
    alpha, sigma = alpha.float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)
    assert torch.allclose(eps, sigma * x_t + alpha * v, atol=1e-6)
    x0, _ = to_x0_eps(eps, x_t, alpha, sigma, "epsilon")
    assert torch.isfinite(x0).all() and x0.abs().max() < 50  # alpha(1) = 5e-5 on the cosine schedule
    direct = tiny("epsilon")
    direct.config.output_parametrization = "direct"
    with torch.no_grad():
        x0_direct, _ = to_x0_eps(direct(x_t, t, cond), x_t, alpha, sigma, "epsilon")
    assert x0_direct[0].abs().max() > 100 * x0[0].abs().max()


def test_output_parametrization_is_checked():
    cfg = default_config("flow", list(shapes.VOCAB))
    with pytest.raises(ValueError, match="output_parametrization must be 'direct' or 'v', got 'x0'"):
        type(cfg)(vocab=cfg.vocab, output_parametrization="x0")
    with pytest.raises(ValueError, match="applies to prediction_type 'epsilon' only, got prediction_type 'flow'"):
        type(cfg)(vocab=cfg.vocab, prediction_type="flow", output_parametrization="v")


def test_images_depend_only_on_their_seed():
    m = tiny()
    a = generate(m, ["one red circle"] * 3, [5, 6, 7], num_steps=2)
    b = generate(m, ["one red circle"], [6], num_steps=2)
    assert torch.allclose(a[1:2], b, atol=1e-6)


def test_tokenizer_rejects_unknown_words():
    with pytest.raises(ValueError, match="unknown word 'pink'"):
        tiny().encode_prompts(["two pink circles"])


def test_bad_model_names_and_dirs(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model 'shapes-gan'.*\['shapes-flow', 'shapes-vp'\]"):
        resolve_model_path("shapes-gan")
    with pytest.raises(FileNotFoundError, match="expected config.json and model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "shapes-unet"}))
    with pytest.raises(FileNotFoundError, match=r"missing \['model.safetensors'\]"):
        load_model(tmp_path)


def test_short_name_without_shipped_weights_says_how_to_build_them(monkeypatch, tmp_path):
    import diffalign.models as models

    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="diffalign pretrain --world shapes --model vp"):
        resolve_model_path("shapes-vp")


@pytest.mark.parametrize("name", ["shapes-flow", "shapes-vp"])
def test_shipped_weights_load_and_beat_chance(name):
    """A real check of the shipped weights: the verifier scores their images far above what an
    untrained model of the same architecture gets on the same prompts and seeds."""
    assert (WEIGHTS_DIR / name / "model.safetensors").stat().st_size < 20 * 2**20
    model = load_model(name)
    prompts = shapes.sample_prompts(48, "heldout", seed=7, relation_fraction=0.0)  # count prompts
    images = generate(model, prompts, list(range(48)), **model.sampling_defaults)
    res = shapes.verify(images, prompts)
    untrained = ShapesDenoiser(model.config).eval()
    base = shapes.verify(generate(untrained, prompts, list(range(48)), **model.sampling_defaults), prompts)
    assert res.score.mean() > base.score.mean() + 0.3
    assert res.correct.mean() >= 0.25


@pytest.mark.parametrize("variant", ["flow", "vp"])
def test_pretraining_lowers_the_loss(tmp_path, variant):
    from diffalign.runtime.pretrain import PretrainConfig, batch_for_step, loss_fn, pretrain

    cfg = PretrainConfig(model=variant, steps=60, batch_size=16, lr=2e-3, warmup=5, log_every=10,
                         checkpoint_every=30, ema_decay=0.8)
    model = pretrain(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    # and the saved model's loss on a fixed batch is below an untrained model's
    images, _, seen = batch_for_step(cfg, 999)
    fresh = ShapesDenoiser(model.config)
    with torch.no_grad():
        l_trained = loss_fn(model, model.encode_images(images), model.encode_prompts(seen), torch.Generator().manual_seed(0))
        l_fresh = loss_fn(fresh, fresh.encode_images(images), fresh.encode_prompts(seen), torch.Generator().manual_seed(0))
    assert l_trained < 0.8 * l_fresh


def test_pretraining_resumes_exactly(tmp_path):
    from diffalign.runtime.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(model="vp", steps=8, batch_size=8, warmup=2, log_every=2, checkpoint_every=4)
    full = pretrain(cfg, tmp_path / "a", progress=False)
    pretrain(cfg, tmp_path / "b", progress=False, stop_at=3)  # interrupted between checkpoints
    resumed = pretrain(cfg, tmp_path / "b", resume=True, progress=False)
    for (k, v), (_, w) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(v, w, atol=1e-6), k


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "diffalign", *args], capture_output=True, text=True)


def test_sample_cli_writes_what_it_promises(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("two red circles\n\na blue square above a green triangle\n")
    out = _cli("sample", "--model", str(tmp_path / "model"), "--prompts", str(prompts), "--num-per-prompt", "2",
               "--out", str(tmp_path / "out"), "--seed", "3", "--steps", "2")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["two red circles"] * 2 + ["a blue square above a green triangle"] * 2
    assert [r["seed"] for r in lines] == [3, 4, 5, 6]
    for r in lines:
        assert (tmp_path / "out" / r["file"]).is_file() and 0 <= r["score"] <= 1
    assert "verifier score" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--prompts", "missing.txt"], "prompts file not found: missing.txt"),
    (["--prompt", "one red circle", "--num-per-prompt", "0"], "--num-per-prompt must be >= 1, got 0"),
    (["--prompt", "one red circle", "--model", "shapes-gan"], "unknown model 'shapes-gan'"),
])
def test_sample_cli_bad_input(tmp_path, args, message):
    base = ["sample", "--out", str(tmp_path / "o")]
    if "--model" not in args:
        base += ["--model", "shapes-flow"]
    out = _cli(*base, *args)
    assert out.returncode != 0 and message in out.stderr
