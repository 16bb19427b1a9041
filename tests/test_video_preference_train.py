"""DenseDPO and VideoDPO as algorithms that sample video pairs and train a video model with them,
on tiny random video pipelines (tests/tiny_video.py; the losses alone: tests/test_preference_wave3.py).

DenseDPO: a pair is two denoisings of one corrupted source, segment labels follow a per-frame reward,
tie segments carry no signal, image models are refused. VideoDPO: OmniScore pairs and weights,
image models too. Both: loss log 2 at initialisation, a training run through ``diffalign train``
that changes the LoRA weights, exact resume, bad config values naming the field, and (slow) a
reward and its negation moving the videos' brightness in opposite directions."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import yaml  # noqa: E402
from test_online_rl import tiny_model  # noqa: E402
from test_preference import assert_resume_matches, first_micro  # noqa: E402
from test_trainer import tiny_dirs  # noqa: E402,F401  (fixture)

from diffalign import algorithms, rewards  # noqa: E402
from diffalign.algorithms.dense_dpo import corruption_grid  # noqa: E402
from diffalign.algorithms.video_preference import (dense_dpo_loss, frame_rewards, latent_frame_pixels,  # noqa: E402
                                                   segment_errors)
from diffalign.core.sampling import generate, sample, seeded_noise  # noqa: E402
from diffalign.models import load_model  # noqa: E402
from diffalign.runtime.lora import Reference, apply_lora, lora_targets  # noqa: E402
from diffalign.runtime.prompts import PromptsConfig  # noqa: E402
from diffalign.runtime.trainer import TrainConfig, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet_diffusers")
PROMPTS = ["a red cube", "two blue balls", "a cat walks", "a dog runs"]
SMALL = {"num_steps": 4, "guidance_scale": 1.0, "pairs_per_epoch": 4, "micro_batch_size": 4, "beta": 100.0}
brightness = rewards.get("brightness")
sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def video_model(tiny_pipeline, arch, lora=False):
    model = load_model(tiny_pipeline(arch)).requires_grad_(False)
    if lora:
        torch.manual_seed(0)
        model = apply_lora(model, 4, 8, lora_targets(model))
    return model


def build(method, model, reward=brightness, **overrides):
    extra = {"metrics": ["saturation"]} if method == "video_dpo" else {}
    cfg = algorithms.build_config(method, {**SMALL, **extra, **overrides})
    return algorithms.get(method)[1](cfg, reward=reward, reference=Reference(model))


def prompts_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return str(f)


# ----- DenseDPO's pairs and labels ---------------------------------------------------------------------------
def test_latent_frames_map_to_the_decoded_frames_of_a_causal_video_vae():
    assert latent_frame_pixels(3, 9) == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]  # the tiny pipelines: 9 frames, 3 latent
    assert latent_frame_pixels(4, 4) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="cannot match 3 latent frames to 8 decoded frames"):
        latent_frame_pixels(3, 8)


def test_dense_dpo_pairs_are_two_denoisings_of_one_corrupted_source(tiny_pipeline):
    model = video_model(tiny_pipeline, "wan")
    batch = build("dense_dpo", model, source="policy", corrupt_t=0.4).collect(model, PROMPTS, epoch=0, seed=5)
    P = len(PROMPTS)
    src, x_t = batch.source, batch.corrupted
    assert src.shape == (P, *model.sample_shape) and x_t.shape == (2 * P, *model.sample_shape)
    alpha, sigma = (v.float() for v in model.schedule.alpha_sigma(torch.tensor(0.4, dtype=torch.float64)))
    e_a, e_b = (x_t[:P] - alpha * src) / sigma, (x_t[P:] - alpha * src) / sigma
    for e in (e_a, e_b):  # both copies hold the one source plus unit Gaussian noise ...
        assert abs(e.std().item() - 1) < 0.1 and abs(e.mean().item()) < 0.1
    assert (e_a - e_b).std().item() > 1.2  # ... drawn independently (std sqrt(2) for the difference)
    grid = corruption_grid(model.schedule.timesteps(4), 0.4)
    assert grid[0].item() == 0.4 and torch.all(grid[1:] < 0.4) and grid[-1].item() == 0
    denoised = sample(model, model.encode_prompts(PROMPTS * 2), noise=x_t, timesteps=grid, sampler="flow_ode").x0
    torch.testing.assert_close(batch.x0, denoised, atol=1e-5, rtol=1e-4)  # each video: its copy, denoised
    # aligned in time: frame by frame, a pair's latents are closer than those of videos from independent noise
    noise = seeded_noise(model.sample_shape, range(1000, 1004))
    independent = sample(model, model.encode_prompts(PROMPTS), noise=noise, sampler="flow_ode", num_steps=4).x0
    per_frame = lambda d: d.abs().mean((0, 1, 3, 4))  # noqa: E731  [F]
    pair_gap, other_gap = per_frame(batch.x0[:P] - batch.x0[P:]), per_frame(batch.x0[:P] - independent)
    assert torch.all(pair_gap < 0.6 * other_gap), (pair_gap, other_gap)
    # and the more the source is corrupted, the further apart the pair
    far = build("dense_dpo", model, source="policy", corrupt_t=0.8).collect(model, PROMPTS, epoch=0, seed=5)
    assert per_frame(far.x0[:P] - far.x0[P:]).mean() > 1.5 * pair_gap.mean()


def test_segment_labels_follow_a_hand_made_per_frame_reward(tiny_pipeline):
    model = video_model(tiny_pipeline, "cogvideox")
    P = len(PROMPTS)

    def redness(images, prompts):  # a per-image reward, so the algorithm scores every frame with it
        return images[:, 0].mean((1, 2))

    first = build("dense_dpo", model, reward=redness, num_segments=2, source="policy").collect(
        model, PROMPTS, epoch=0, seed=3)
    with torch.no_grad():
        per_frame = model.decode(first.x0).float()[:, :, 0].mean((2, 3))  # [2P, 9] by hand
    torch.testing.assert_close(first.frame_rewards, per_frame)
    seg = torch.stack([per_frame[:, :5].mean(1), per_frame[:, 5:].mean(1)], 1)  # latent {0, 1}: 0-4; {2}: 5-8
    gap = seg[:P] - seg[P:]
    g = gap.abs().flatten().sort().values
    margin = ((g[3] + g[4]) / 2).item()  # between two gaps: half of the segments tie
    batch = build("dense_dpo", model, reward=redness, num_segments=2, source="policy", tie_margin=margin).collect(
        model, PROMPTS, epoch=0, seed=3)
    expected = (gap > margin).long() - (gap < -margin).long()
    keep = torch.nonzero(expected.abs().sum(1) > 0).flatten()
    assert (expected == 0).sum() == 4 and len(keep) > 0
    assert batch.labels.tolist() == expected[keep].tolist()
    assert batch.chosen.tolist() == keep.tolist() and batch.rejected.tolist() == (keep + P).tolist()
    assert batch.info["pairs"] == len(keep) and batch.info["segments_labelled"] == 0.5


def test_a_tie_segment_contributes_nothing(tiny_pipeline):
    g = torch.Generator().manual_seed(0)
    err_a, err_b = (torch.rand(2, 3, generator=g).requires_grad_() for _ in range(2))
    ref_a, ref_b = torch.rand(2, 3, generator=g), torch.rand(2, 3, generator=g)
    y = torch.tensor([[1, 0, -1], [0, 1, 0]])
    loss, _ = dense_dpo_loss(err_a, err_b, ref_a, ref_b, y, 20.0)
    ga, gb = torch.autograd.grad(loss, [err_a, err_b])
    assert torch.all(ga[y == 0] == 0) and torch.all(gb[y == 0] == 0) and torch.all(ga[y != 0] != 0)
    m = -10 * ((err_a - ref_a) - (err_b - ref_b)).detach()
    hand = sum(-math.log(sig(y[i, s].item() * m[i, s].item())) for i in range(2) for s in range(3) if y[i, s]) / 3
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    # on a model whose policy has moved off the reference: the loss is the mean over labelled segments only
    model = video_model(tiny_pipeline, "wan", lora=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=g)
    algo = build("dense_dpo", model, source="policy", beta=100.0)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=1)
    batch.labels[:, 1] = 0  # every pair ties on the middle segment
    batch.labels[:, 0] = 1
    micro = first_micro(algo, batch)
    loss, stats = algo.loss(model, micro)
    with torch.no_grad():
        e = segment_errors(algo.errors(model, micro, reduce=False), 3)
        r = segment_errors(algo.errors(model, micro, reference=True, reduce=False), 3)
    M = len(micro.idx) // 2
    margin = -100 * 0.5 * ((e[:M] - r[:M]) - (e[M:] - r[M:]))
    lab = batch.labels[[batch.chosen.tolist().index(i) for i in micro.idx[:M].tolist()]].float()
    hand = -(F.logsigmoid(lab * margin) * lab.abs()).sum() / lab.abs().sum()
    assert margin.abs().max() > 1e-3 and loss.item() == pytest.approx(hand.item(), rel=1e-4)
    assert stats["labelled_frac"] == pytest.approx(lab.abs().mean().item())


# ----- both methods on a model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method,arch", [("dense_dpo", "wan"), ("dense_dpo", "cogvideox"), ("video_dpo", "wan"),
                                         ("video_dpo", "cogvideox"), ("video_dpo", "image")])
def test_at_initialisation_the_loss_is_log_2(tiny_pipeline, method, arch):
    model = tiny_model() if arch == "image" else video_model(tiny_pipeline, arch, lora=True)
    prompts = ["two red circles", "one blue square"] * 2 if arch == "image" else PROMPTS
    algo = build(method, model, num_steps=3)
    batch = algo.collect(model, prompts, epoch=0, seed=2)
    assert batch.info["pairs"] > 0
    loss, stats = algo.loss(model, first_micro(algo, batch))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    if method == "video_dpo":
        assert stats["reward_margin"] == pytest.approx(0, abs=1e-4)  # policy = reference up to round-off (4e-6 seen)


def test_video_dpo_pairs_best_and_worst_by_omniscore_with_gap_weights(tiny_pipeline):
    model = video_model(tiny_pipeline, "wan")
    algo = build("video_dpo", model, source="policy", group_size=3, alpha=2.0)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=4)
    scores = batch.omni_scores  # [N, 2]: brightness (the training reward), saturation
    with torch.no_grad():
        torch.testing.assert_close(scores[:, 0], brightness(model.decode(batch.x0).float(), batch.prompts))
    torch.testing.assert_close(scores[:, 1], rewards.get("saturation")(batch.images, batch.prompts))  # stored videos
    z = scores.view(4, 3, 2)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, unbiased=False, keepdim=True)
    omni = z.mean(2)  # [prompt, sample]
    assert batch.chosen.tolist() == (omni.argmax(1) + torch.arange(4) * 3).tolist()
    assert batch.rejected.tolist() == (omni.argmin(1) + torch.arange(4) * 3).tolist()
    gap2 = (omni.max(1).values - omni.min(1).values) ** 2
    torch.testing.assert_close(batch.weights, gap2 / gap2.mean(), rtol=1e-4, atol=1e-6)
    algo.panel = [lambda images, prompts: torch.tensor([float("nan")] + [0.5] * (len(prompts) - 1))]
    dropped = algo.collect(model, PROMPTS, epoch=0, seed=4)  # a failed dimension drops its sample
    assert 0 not in dropped.chosen.tolist() + dropped.rejected.tolist() and dropped.info["metric_failed"] == 1


def test_dense_dpo_through_diffalign_train_changes_the_lora_weights(tiny_pipeline, tmp_path):
    from typer.testing import CliRunner

    from diffalign.cli import app

    cfg = {"model": str(tiny_pipeline("wan")), "method": "dense_dpo", "reward": "brightness", "epochs": 1,
           "lr": 1e-2, "lora_rank": 4, "lora_alpha": 8, "checkpoint_every": 1,
           "prompts": {"file": prompts_file(tmp_path)}, "algorithm": {**SMALL, "source": "policy"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["pairs"] > 0 and row["loss"] == pytest.approx(math.log(2), abs=1e-4)  # one step, from the reference
    trained = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=False)["trainable"]
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0  # B starts at 0: the step moved the adapter
    assert (tmp_path / "run" / "final" / "lora").is_dir()


@pytest.mark.parametrize("method,arch", [("dense_dpo", "wan"), ("video_dpo", "cogvideox")])
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny_pipeline, tmp_path, method, arch):
    extra = {"metrics": ["saturation"], "group_size": 2} if method == "video_dpo" else {}
    cfg = TrainConfig(model=str(tiny_pipeline(arch)), method=method, reward="brightness", epochs=3, lr=1e-2,
                      lora_rank=4, lora_alpha=8, checkpoint_every=1, prompts=PromptsConfig(file=prompts_file(tmp_path)),
                      algorithm={**SMALL, "pairs_per_epoch": 2, "source": "policy", **extra})
    assert_resume_matches(cfg, tmp_path)


# ----- refusals and bad input ----------------------------------------------------------------------------------
def test_dense_dpo_refuses_an_image_model(tiny_dirs, tmp_path):  # noqa: F811
    model = tiny_model()
    algo = build("dense_dpo", model)
    with pytest.raises(ValueError, match=r"dense_dpo trains video models: it needs a model whose sample is a 4-D "
                                         r"latent \[C, F, H, W\]; the ShapesDenoiser model samples \(3, 32, 32\) "
                                         r"\(an image model\)"):
        algo.collect(model, ["two red circles"], epoch=0, seed=0)
    cfg = TrainConfig(model=str(tiny_dirs / "flow"), method="dense_dpo", epochs=1, algorithm=SMALL)
    with pytest.raises(ValueError, match="dense_dpo trains video models"):
        train(cfg, tmp_path / "run", progress=False)


def test_dense_dpo_refuses_more_segments_than_latent_frames_and_whole_video_rewards(tiny_pipeline):
    model = video_model(tiny_pipeline, "wan")
    with pytest.raises(ValueError, match=r"num_segments=4 exceeds the model's 3 latent frames; choose num_segments "
                                         r"in \[1, 3\]"):
        build("dense_dpo", model, num_segments=4).collect(model, PROMPTS, epoch=0, seed=0)
    videos = torch.rand(2, 9, 3, 8, 8)
    with pytest.raises(ValueError, match="'motion_magnitude' scores whole videos or groups"):
        frame_rewards(rewards.get("motion_magnitude"), videos, ["a", "b"])
    with pytest.raises(ValueError, match="frames='min'"):
        frame_rewards(rewards.get("brightness", frames="min"), videos, ["a", "b"])


@pytest.mark.parametrize("method,overrides,message", [
    ("dense_dpo", {"corrupt_t": 1.0}, "corrupt_t must be in (0, 1), got 1.0"),
    ("dense_dpo", {"num_segments": 0}, "num_segments must be an integer in [1, inf), got 0"),
    ("dense_dpo", {"tie_margin": -0.1}, "tie_margin must be in [0, inf), got -0.1"),
    ("dense_dpo", {"group_size": 4}, "group_size must be 2 for dense_dpo"),
    ("dense_dpo", {"min_margin": 0.1}, "set tie_margin instead"),
    ("dense_dpo", {"source": "file", "data": "pairs.jsonl"}, "source must be 'reference' or 'policy' for dense_dpo"),
    ("video_dpo", {}, "metrics must name at least one reward"),
    ("video_dpo", {"metrics": [3]}, "metrics[0] must be a reward name or a dict with a 'name'"),
    ("video_dpo", {"metrics": ["clipscore"], "alpha": -1.0}, "alpha must be in [0, inf), got -1.0"),
    ("video_dpo", {"metrics": ["clipscore"], "source": "file", "data": "x"}, "source must be 'reference' or 'policy'"),
])
def test_bad_config_is_a_clear_error(method, overrides, message):
    with pytest.raises(ValueError) as e:
        algorithms.build_config(method, overrides)
    assert message in str(e.value)


@pytest.mark.parametrize("name", ["dense_dpo_wan", "video_dpo_wan"])
def test_shipped_video_configs_are_valid(name):
    from pathlib import Path

    from diffalign.config import load_config

    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    algo = algorithms.build_config(cfg.method, cfg.algorithm)
    assert cfg.method == name.removesuffix("_wan") and cfg.lora_rank > 0 and cfg.mixed_precision == "bf16"
    assert algo.prompts_per_epoch > 0 and cfg.model.startswith("models/")


# ----- it learns (slow) ---------------------------------------------------------------------------------------
class Darkness:
    """``1 - brightness``: the training reward negated, to check that the direction comes from it."""

    name = "test_darkness"

    def __call__(self, images, prompts, meta=None):
        return 1 - brightness(images, prompts)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dense_dpo", "video_dpo"])
def test_it_learns_a_per_frame_reward_and_its_negation_moves_the_other_way(tiny_pipeline, tmp_path, method):
    """CogVideoX, full fine-tuning, 20 epochs of 4 on-policy pairs: brightness of fixed-seed ODE samples
    (every frame, and the last segment's frames) rises under brightness and falls under its negation."""
    rewards.register("test_darkness", Darkness, overwrite=True)
    model_dir = tiny_pipeline("cogvideox")
    prompts, seeds = PROMPTS * 2, list(range(100, 108))

    def luma(model):
        v = generate(model.eval(), prompts, seeds, sampler="ddim", num_steps=4)
        frame = (0.299 * v[:, :, 0] + 0.587 * v[:, :, 1] + 0.114 * v[:, :, 2]).mean((2, 3))  # [B, F]
        return frame.mean().item(), frame[:, 5:].mean().item()

    extra = {"metrics": ["saturation"]} if method == "video_dpo" else {}
    after = {}
    for reward in ("brightness", "test_darkness"):
        cfg = TrainConfig(model=str(model_dir), method=method, reward=reward, epochs=20, lr=2e-3, checkpoint_every=100,
                          prompts=PromptsConfig(file=prompts_file(tmp_path)),
                          algorithm={**SMALL, "beta": 5000.0, "source": "policy", "inner_epochs": 2, **extra})
        after[reward] = luma(load_model(train(cfg, tmp_path / reward, progress=False)))
    base = luma(load_model(model_dir))
    for k in range(2):  # all frames; the last segment's frames
        assert after["brightness"][k] > base[k] > after["test_darkness"][k], (base, after)
        assert after["brightness"][k] - after["test_darkness"][k] > 0.01, (base, after)
