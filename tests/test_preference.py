"""Preference optimisation: Diffusion-DPO, Diffusion-KTO, MaPO (pairs of clean samples), D3PO and SPO
(trajectory steps), Diffusion-NPO (a negative model in the unconditional branch of guidance)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_online_rl import tiny_model, verifier_reward
from test_trainer import rows, tiny_dirs  # noqa: F401  (fixture)

from diffalign import algorithms
from diffalign.algorithms.preference import (
    PairBatch,
    denoising_error,
    diffusion_dpo_loss,
    diffusion_kto_loss,
    mapo_loss,
    mapo_score,
    sample_timesteps,
)
from diffalign.algorithms.stepwise_preference import stepwise_dpo_loss
from diffalign.core.parametrization import guided_prediction
from diffalign.core.sampling import generate
from diffalign.core.schedules import FlowSchedule
from diffalign.data import PreferencePair, write_jsonl_pairs
from diffalign.models import load_model
from diffalign.runtime.lora import Reference
from diffalign.runtime.prompts import PromptsConfig
from diffalign.runtime.trainer import TrainConfig, train
from diffalign.worlds import shapes

PROMPTS = ["two red circles", "a blue square left of a green triangle", "one yellow square", "three purple triangles"]
PAIRED = ["dpo", "kto", "mapo", "npo"]
STEPWISE = ["d3po", "spo"]


def build(method, model, **overrides):
    small = {"num_steps": 3} if method in STEPWISE else {"num_steps": 3, "pairs_per_epoch": 4, "micro_batch_size": 4}
    cfg = algorithms.build_config(method, {**small, **overrides})
    _, cls, _ = algorithms.get(method)
    return cls(cfg, reward=verifier_reward, reference=Reference(model) if cfg.beta > 0 else None)


def first_micro(algo, batch, seed=0):
    return next(iter(algo.minibatches(batch, torch.Generator().manual_seed(seed))))[0]


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def assert_opposite(g, h):
    """``h == -g`` up to float rounding (a batch's order changes the last bits of a 70k-dim gradient)."""
    assert g.norm() > 0
    assert F.cosine_similarity(g, h, dim=0).item() < -0.99999
    assert h.norm().item() == pytest.approx(g.norm().item(), rel=1e-3)


# ----- losses on hand-made tensors ------------------------------------------------------------------
def test_dpo_loss_matches_its_definition():
    err_w, err_l = torch.tensor([0.30, 0.50, 0.20]), torch.tensor([0.40, 0.45, 0.20])
    ref_w, ref_l = torch.tensor([0.31, 0.49, 0.25]), torch.tensor([0.38, 0.47, 0.20])
    beta = 2000.0
    loss, stats = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta)
    inside = [-beta * 0.5 * ((w - rw) - (lo - rl)) for w, lo, rw, rl in zip(err_w.tolist(), err_l.tolist(),
                                                                            ref_w.tolist(), ref_l.tolist())]
    expected = sum(-math.log(1 / (1 + math.exp(-x))) for x in inside) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["reward_margin"] == pytest.approx(sum(inside) / 3, rel=1e-4)
    assert stats["implicit_acc"] == pytest.approx(2 / 3)  # 10 and 20 > 0, -40 < 0


def test_dpo_at_equal_policy_and_reference_has_margin_zero_and_loss_log_2():
    e = torch.rand(5)
    loss, stats = diffusion_dpo_loss(e, e.flip(0), e, e.flip(0), 5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7) and stats["reward_margin"] == 0


def test_kto_loss_matches_its_definition():
    err, ref = torch.tensor([0.2, 0.3, 0.5, 0.4]), torch.tensor([0.25, 0.3, 0.45, 0.5])
    desirable = torch.tensor([True, False, False, True])
    beta, ld, lu = 10.0, 1.0, 1.5
    loss, stats = diffusion_kto_loss(err, ref, desirable, beta, ld, lu)
    g = [-(e - r) for e, r in zip(err.tolist(), ref.tolist())]  # 0.05, 0, -0.05, 0.1
    q = max(0.0, sum(g) / 4)  # 0.025
    sig = lambda x: 1 / (1 + math.exp(-x))
    terms = [(ld if d else lu) * (1 - sig(beta * (1 if d else -1) * (gi - q))) for gi, d in zip(g, desirable.tolist())]
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-5)
    assert stats["kl_ref_point"] == pytest.approx(q, rel=1e-5)
    # the reference point is clamped at 0 and carries no gradient
    err2 = torch.tensor([0.3, 0.4], requires_grad=True)
    _, s = diffusion_kto_loss(err2, torch.tensor([0.2, 0.2]), torch.tensor([True, False]), 1.0)
    assert s["kl_ref_point"] == 0.0


def test_mapo_score_is_bounded_and_decreasing_and_the_loss_matches_its_definition():
    L = torch.tensor([0.0, 1e-9, 0.01, 0.5, 2.0, 50.0])
    s = mapo_score(L, 0.5)
    assert s[0] == 1.0 and torch.all(s[:-1] >= s[1:]) and torch.all((s > 0) & (s <= 1))
    assert s[3].item() == pytest.approx(0.25 / math.expm1(0.25), rel=1e-6)
    err_w, err_l = torch.tensor([0.10, 0.30]), torch.tensor([0.12, 0.25])
    loss, stats = mapo_loss(err_w, err_l, beta=0.1, gamma=0.5, T=1000.0)
    sc = lambda x: 0.5 * x / math.expm1(0.5 * x)
    m = [1000 * (sc(w) - sc(lo)) for w, lo in zip(err_w.tolist(), err_l.tolist())]
    expected = sum(w - 0.1 * math.log(1 / (1 + math.exp(-x))) for w, x in zip(err_w.tolist(), m)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5) and stats["implicit_acc"] == 0.5


def test_stepwise_dpo_loss_matches_its_definition_and_clips_the_ratios():
    lp_w, ref_w = torch.tensor([-1.00, -2.0]), torch.tensor([-1.02, -2.0])
    lp_l, ref_l = torch.tensor([-1.50, -3.0]), torch.tensor([-1.49, -2.5])  # 2nd: log r^l = -0.5 < log 0.9
    loss, stats = stepwise_dpo_loss(lp_w, ref_w, lp_l, ref_l, beta=10.0, clip_range=0.1)
    m1 = 10 * (0.02 - (-0.01))
    m2 = 10 * (0.0 - math.log(0.9))
    expected = (-math.log(1 / (1 + math.exp(-m1))) - math.log(1 / (1 + math.exp(-m2)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5) and stats["clip_frac"] == 0.5
    # a clipped ratio passes no gradient
    lp = lp_l.clone().requires_grad_(True)
    stepwise_dpo_loss(lp_w, ref_w, lp, ref_l, 10.0, 0.1)[0].backward()
    assert lp.grad[1] == 0 and lp.grad[0] != 0


def test_denoising_error_is_in_the_model_parametrisation_and_converts():
    class Const(torch.nn.Module):  # predicts a fixed velocity
        prediction_type = "flow"

        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, x_t, t, cond):
            return self.v.expand_as(x_t)

    g = torch.Generator().manual_seed(0)
    x0, noise, v = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g), torch.randn(2, 4, 4)
    t = torch.tensor([0.2, 0.5, 0.9])
    kw = {"schedule": FlowSchedule(), "prediction_type": "flow"}
    native = denoising_error(Const(v), x0, t, noise, None, **kw)
    torch.testing.assert_close(native, ((noise - x0) - v).pow(2).mean(dim=(1, 2, 3)))
    # flow: eps_hat - eps = (1 - t) (v_hat - v), so the epsilon error is (1 - t)^2 times the velocity error
    eps_err = denoising_error(Const(v), x0, t, noise, None, error_space="epsilon", **kw)
    torch.testing.assert_close(eps_err, (1 - t) ** 2 * native, rtol=1e-5, atol=1e-6)


def test_timesteps_are_uniform_on_the_unit_interval_or_the_vp_training_grid():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(FlowSchedule(), 4000, g)
    assert 0 < t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02
    vp = tiny_model("epsilon").schedule
    k = sample_timesteps(vp, 500, g) * vp.num_train_timesteps - 1
    torch.testing.assert_close(k, k.round(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("dist", ["uniform", "logit_normal"])
def test_a_restricted_t_range_draws_inside_it_and_the_full_range_draws_as_before(dist):
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    full = sample_timesteps(FlowSchedule(), 64, g(), dist, 0.0, 1.0)
    assert torch.equal(full, sample_timesteps(FlowSchedule(), 64, g(), dist))
    t = sample_timesteps(FlowSchedule(), 4000, g(), dist, 0.6, 0.9)
    assert 0.6 <= t.min() and t.max() <= 0.9 and t.max() - t.min() > 0.28
    if dist == "uniform":
        assert abs(t.mean().item() - 0.75) < 0.01
    else:  # logit-normal mass falls towards 0.5: the restricted mean lies below the interval's middle
        assert t.mean().item() < 0.74
    vp = tiny_model("epsilon").schedule
    t = sample_timesteps(vp, 2000, g(), dist, 0.6, 1.0)
    k = t * vp.num_train_timesteps - 1
    assert t.min() >= 0.6 and t.max() == 1.0 and len(k.round().unique()) > 0.3 * vp.num_train_timesteps


def test_dpo_trains_inside_its_t_range_and_a_bad_range_names_the_fields():
    model = tiny_model()
    algo = build("dpo", model, t_min=0.7)
    micro = first_micro(algo, algo.collect(model, PROMPTS, epoch=0, seed=1))
    assert micro.t.min() >= 0.7
    with pytest.raises(ValueError, match="t_min=0.8 must be < t_max=0.5"):
        build("dpo", model, t_min=0.8, t_max=0.5)
    with pytest.raises(ValueError, match="t_max"):
        build("dpo", model, t_max=1.5)


# ----- invariants of the algorithms ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dpo", "npo", "d3po", "spo"])
def test_at_initialisation_the_margin_is_zero_and_the_loss_is_log_2(method):
    model = tiny_model()
    algo = build(method, model, **({"threshold": 0.0} if method == "spo" else {}))
    batch = algo.collect(model, PROMPTS, epoch=0, seed=1)
    assert batch.info["pairs"] > 0
    loss, stats = algo.loss(model, first_micro(algo, batch))
    # the frozen reference equals the policy; the two differ only by float rounding of the attention fast path
    assert loss.item() == pytest.approx(math.log(2), abs=2e-4)
    assert abs(stats["reward_margin"]) < 5e-4


@pytest.mark.parametrize("method", ["dpo", "mapo"])
def test_several_timesteps_per_pair_train_in_one_pass_as_the_mean_over_draws(method):
    from diffalign.algorithms.preference import PairMicroBatch

    model = tiny_model()
    algo = build(method, model, timesteps_per_pair=2, micro_batch_size=64)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=2)
    n = len(batch.chosen)
    micro = first_micro(algo, batch)  # every pair twice, both images of each, in one pass
    assert len(micro.idx) == 4 * n and len(set(micro.t.tolist())) == 2 * n
    assert torch.equal(micro.idx[:n], micro.idx[n:2 * n]) and torch.equal(micro.t[:2 * n], micro.t[2 * n:])

    def part(rows):
        pos = torch.cat([rows, rows + 2 * n])  # the chosen rows, then their rejected partners
        return PairMicroBatch(batch, micro.idx[pos], micro.t[pos], micro.noise[pos], dropped=micro.dropped[pos])

    fused = grads(model, algo.loss(model, micro)[0])
    halves = [grads(model, algo.loss(model, part(torch.arange(k * n, (k + 1) * n)))[0]) for k in range(2)]
    mean = (halves[0] + halves[1]) / 2  # equal up to float rounding of other batch sizes
    torch.testing.assert_close(fused, mean, atol=1e-4 * mean.abs().max().item(), rtol=1e-4)
    assert (halves[0] - halves[1]).abs().max() > 1e-2 * mean.abs().max()  # the two draws differ


def _swap(batch):
    if isinstance(batch, PairBatch):
        batch.chosen, batch.rejected = batch.rejected, batch.chosen
    else:  # step pairs
        batch.x_w, batch.x_l = batch.x_l, batch.x_w
        if batch.x_t_l is not None:
            batch.x_t_w, batch.x_t_l = batch.x_t_l, batch.x_t_w
    return batch


@pytest.mark.parametrize("method", ["dpo", "d3po", "spo"])
def test_swapping_chosen_and_rejected_reverses_the_gradient(method):
    model = tiny_model()
    algo = build(method, model, **({"threshold": 0.0} if method == "spo" else {}))
    batch = algo.collect(model, PROMPTS, epoch=0, seed=2)
    g = grads(model, algo.loss(model, first_micro(algo, batch))[0])
    g_swapped = grads(model, algo.loss(model, first_micro(algo, _swap(batch)))[0])
    assert_opposite(g, g_swapped)


def test_npo_is_dpo_on_swapped_pairs():
    model = tiny_model()
    dpo, npo = build("dpo", model), build("npo", model, beta=5000.0)
    b_dpo, b_npo = (a.collect(model, PROMPTS, epoch=0, seed=3) for a in (dpo, npo))
    assert torch.equal(b_npo.chosen, b_dpo.rejected) and torch.equal(b_npo.rejected, b_dpo.chosen)
    g_dpo = grads(model, dpo.loss(model, first_micro(dpo, b_dpo))[0])
    g_npo = grads(model, npo.loss(model, first_micro(npo, b_npo))[0])
    assert_opposite(g_dpo, g_npo)


def test_pairs_share_timestep_and_noise_and_are_best_against_worst():
    model = tiny_model()
    algo = build("dpo", model, pairs_per_epoch=4, group_size=4)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=4)
    scores = batch.rewards
    for w, lo in zip(batch.chosen.tolist(), batch.rejected.tolist()):
        group = range(w // 4 * 4, w // 4 * 4 + 4)
        assert w in group and lo in group and batch.prompts[w] == batch.prompts[lo]
        assert scores[w] == max(scores[i] for i in group) > scores[lo] == min(scores[i] for i in group)
    micro = first_micro(algo, batch)
    t_w, t_l = micro.t.chunk(2)
    n_w, n_l = micro.noise.chunk(2)
    assert torch.equal(t_w, t_l) and torch.equal(n_w, n_l)


def test_reference_source_samples_the_frozen_model_not_the_policy():
    model = tiny_model()
    algo = build("dpo", model, source="reference")
    before = algo.collect(model, PROMPTS, epoch=0, seed=5)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = algo.collect(model, PROMPTS, epoch=0, seed=5)
    assert torch.equal(before.x0, after.x0)  # pairs still come from the base model
    online = build("dpo", model, source="policy").collect(model, PROMPTS, epoch=0, seed=5)
    assert not torch.equal(online.x0, before.x0)


def test_kto_threshold_labels_every_sample():
    model = tiny_model()
    algo = build("kto", model, desirable_threshold=0.3)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=6)
    r = batch.rewards
    assert len(batch.chosen) + len(batch.rejected) == len(batch)
    assert torch.all(r[batch.chosen] >= 0.3) and torch.all(r[batch.rejected] < 0.3)
    micro = first_micro(algo, batch)
    loss, stats = algo.loss(model, micro)
    assert torch.isfinite(loss) and 0 <= stats["desirable_frac"] <= 1


def test_mapo_never_touches_a_reference_model(tiny_dirs, tmp_path, monkeypatch):  # noqa: F811
    from diffalign.algorithms.preference import MaPO, MaPOConfig
    from diffalign.runtime import trainer

    assert MaPOConfig().beta == 0.0  # the runtime builds a reference only for beta > 0
    with pytest.raises(ValueError, match="reference-free"):
        MaPO(MaPOConfig(), reward=verifier_reward, reference=Reference(tiny_model()))

    def no_reference(*a, **k):
        raise AssertionError("MaPO built a reference model")

    monkeypatch.setattr(trainer, "Reference", no_reference)
    cfg = TrainConfig(model=str(tiny_dirs / "flow"), method="mapo", epochs=2, checkpoint_every=10,
                      algorithm={"pairs_per_epoch": 4, "num_steps": 3, "micro_batch_size": 4})
    train(cfg, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in rows(tmp_path / "run") if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)


# ----- offline pairs from a file ------------------------------------------------------------------------
def _pairs_file(tmp_path, ties=False, n=6):
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pairs = [PreferencePair(PROMPTS[i % 4], img(), img(), tie=ties) for i in range(n)]
    return write_jsonl_pairs(pairs, tmp_path / "pairs" / "pairs.jsonl"), pairs


def test_file_source_reads_pairs_and_skips_ties(tmp_path):
    path, pairs = _pairs_file(tmp_path)
    model = tiny_model()
    algo = build("dpo", model, source="file", data=str(path), pairs_per_epoch=4)
    batch = algo.collect(model, [], epoch=0, seed=0)
    assert len(batch.chosen) == 4 and len(batch) == 8
    # the chosen images are the files' chosen images, in model space
    by_prompt = {p.prompt: p for p in pairs}
    for i in batch.chosen.tolist():
        got = ((batch.x0[i] + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert any(np.array_equal(got, p.chosen) for p in pairs if p.prompt == batch.prompts[i])
    assert set(batch.prompts) <= set(by_prompt)
    loss, _ = algo.loss(model, first_micro(algo, batch))
    assert torch.isfinite(loss)


def test_a_dataset_with_no_non_tie_pairs_is_an_error(tmp_path):
    path, _ = _pairs_file(tmp_path, ties=True)
    model = tiny_model()
    algo = build("dpo", model, source="file", data=str(path))
    with pytest.raises(ValueError, match="holds no non-tie pairs"):
        algo.collect(model, [], epoch=0, seed=0)


def test_pairs_of_the_wrong_image_size_are_an_error(tmp_path):
    pairs = [PreferencePair("two red circles", np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8))]
    path = write_jsonl_pairs(pairs, tmp_path / "p.jsonl")
    model = tiny_model()
    with pytest.raises(ValueError, match=r"encode to \(3, 16, 16\), but the model samples \(3, 32, 32\)"):
        build("dpo", model, source="file", data=str(path)).collect(model, [], epoch=0, seed=0)


# ----- Diffusion-NPO at sampling time ------------------------------------------------------------------
def test_negative_model_replaces_only_the_unconditional_branch():
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.7, 0.3])
    cond, uncond = model.encode_prompts(PROMPTS[:2]), model.encode_prompts(["", ""])
    with torch.no_grad():
        plain = guided_prediction(model, x, t, cond, uncond, 3.0)
        same = guided_prediction(model, x, t, cond, uncond, 3.0, negative_model=model)
        neg = guided_prediction(model, x, t, cond, uncond, 3.0, negative_model=other)
        expected = other(x, t, uncond) + 3.0 * (model(x, t, cond) - other(x, t, uncond))
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(neg, expected, rtol=1e-4, atol=1e-5)
    images = generate(model, PROMPTS[:2], [0, 1], num_steps=3, guidance_scale=3.0, negative_model=other)
    assert not torch.allclose(images, generate(model, PROMPTS[:2], [0, 1], num_steps=3, guidance_scale=3.0))


# ----- resume and bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,extra", [
    ("dpo", {"steps_per_epoch": 2, "micro_batch_size": 2}), ("kto", {"source": "policy"}),
    ("d3po", {"timestep_fraction": 0.5}), ("spo", {"threshold": 0.0, "num_candidates": 2}),
])
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny_dirs, tmp_path, method, extra):  # noqa: F811
    small = {"num_steps": 3, "prompts_per_epoch": 2} if method in STEPWISE else \
        {"num_steps": 3, "pairs_per_epoch": 3, "group_size": 3}
    cfg = TrainConfig(model=str(tiny_dirs / "flow"), method=method, epochs=3, checkpoint_every=1, lr=1e-3,
                      heldout_rewards=["shapes_soft"], algorithm={**small, **extra})
    assert_resume_matches(cfg, tmp_path)


def assert_resume_matches(cfg, tmp_path):
    """A 3-epoch run cut after 2 epochs and resumed logs the metrics of the uninterrupted run."""
    train(cfg, tmp_path / "full", progress=False)
    assert train(cfg, tmp_path / "cut", progress=False, stop_at=2) is None
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    timing = {"sample_s", "train_s", "images_per_s", "elapsed_s"}
    full, cut = ([{k: v for k, v in r.items() if k not in timing} for r in rows(tmp_path / d)] for d in ("full", "cut"))
    assert full == cut and len(full) == 3


@pytest.mark.parametrize("name", ["dpo_shapes", "kto_shapes", "mapo_shapes", "npo_shapes", "d3po_shapes",
                                  "spo_shapes", "dpo_sd15"])
def test_configs_are_valid(name):
    from pathlib import Path

    from diffalign.config import load_config

    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    algo = algorithms.build_config(cfg.method, cfg.algorithm)
    assert cfg.method == name.split("_")[0] and algo.prompts_per_epoch > 0
    if name == "dpo_sd15":  # the paper's scale
        assert algo.beta == 5000 and cfg.lr == pytest.approx(1e-8 * 2048) and algo.pairs_per_epoch == 2048
    if cfg.method == "mapo":
        assert algo.beta == 0


@pytest.mark.parametrize("method,overrides,message", [
    ("dpo", {"betta": 1.0}, "betta"),
    ("dpo", {"beta": -1.0}, "beta must be in (0, inf), got -1.0"),
    ("dpo", {"source": "web"}, "source must be one of"),
    ("dpo", {"source": "file"}, "source 'file' needs `data`"),
    ("dpo", {"data": "pairs.jsonl"}, "is read only with source 'file'"),
    ("dpo", {"group_size": 1}, "group_size must be an integer in [2, inf), got 1"),
    ("dpo", {"error_space": "noise"}, "error_space must be one of"),
    ("kto", {"lambda_u": 0.0}, "lambda_u must be in (0, inf), got 0.0"),
    ("kto", {"source": "file", "data": "x.jsonl", "desirable_threshold": 0.5}, "chosen images are the desirable"),
    ("mapo", {"source": "reference"}, "MaPO is reference-free"),
    ("mapo", {"beta": 1.0}, "beta"),
    ("d3po", {"clip_range": 1.5}, "clip_range must be in (0, 1), got 1.5"),
    ("d3po", {"sampler": "flow_ode"}, "sampler must be one of"),
    ("spo", {"num_candidates": 1}, "num_candidates must be an integer in [2, inf), got 1"),
])
def test_bad_config_is_a_clear_error(method, overrides, message):
    with pytest.raises(ValueError) as e:
        algorithms.build_config(method, overrides)
    assert message in str(e.value)


# ----- it learns (shapes world, shipped model) ------------------------------------------------------------
# Prompts where shapes-flow is right about half the time (counts of three and four). Each run is seeded, so
# before / after are compared on the same noise; the settings are the ones measured to learn in 8 epochs.
SUBSET = ["three red circles", "three blue squares", "four green triangles", "three yellow circles"]
PAIR_RUN = {"source": "policy", "pairs_per_epoch": 4, "group_size": 8, "inner_epochs": 2, "beta": 250.0}


def verifier_result(model, negative_model=None):
    prompts = [p for p in SUBSET for _ in range(16)]
    images = generate(model, prompts, list(range(1000, 1064)), num_steps=10, guidance_scale=3.0,
                      negative_model=negative_model)
    v = shapes.verify(images, prompts)
    return float(np.mean(v.score)), float(np.mean(v.correct))


def brightness(model, negative_model=None):
    prompts = [p for p in SUBSET for _ in range(8)]
    images = generate(model, prompts, list(range(1000, 1032)), num_steps=10, guidance_scale=3.0,
                      negative_model=negative_model)
    return images.mean().item()


def train_on_subset(method, reward, lr, algorithm, tmp_path, epochs=None):
    (tmp_path / "prompts.txt").write_text("\n".join(SUBSET))
    epochs = epochs or (8 if reward == "shapes" else 6)
    cfg = TrainConfig(model="shapes-flow", method=method, reward=reward, epochs=epochs, lr=lr,
                      checkpoint_every=100, prompts=PromptsConfig(file=str(tmp_path / "prompts.txt")),
                      algorithm=algorithm)
    return load_model(train(cfg, tmp_path / "run", progress=False)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("method,extra,lr", [
    ("dpo", PAIR_RUN, 3e-5),
    # the shipped (layout-role) base, accuracy 35 / 64 here: KTO at 3e-5 +1 / 64 (12 epochs: +1), at 5e-5 +6 / 64
    ("kto", PAIR_RUN, 5e-5),
    # the shipped base: SPO at 5e-5 +2 / 64 (12 epochs: +1), at 3e-5 +6 / 64; v2 base: at lr 1e-4 SPO's score rose
    # (0.900 -> 0.938) but its accuracy fell by 1/32; at 5e-5, 0.563 -> 0.688
    ("spo", {"prompts_per_epoch": 8, "step_reward": "shapes_soft", "threshold": 0.02}, 3e-5),
])
def test_it_learns_the_verifier_on_a_fixed_prompt_subset(method, extra, lr, tmp_path):
    tuned = train_on_subset(method, "shapes", lr, extra, tmp_path)
    before, after = verifier_result(load_model("shapes-flow").eval()), verifier_result(tuned)
    assert after[0] > before[0] and after[1] >= before[1] + 3 / 64, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("method,extra,lr,epochs", [
    # MaPO trains the guided prediction: its supervised term on CFG samples would otherwise distil the
    # guidance into the conditional branch, which sampling then guides again (darker, worse images)
    # the shipped (layout-role) base: MaPO's brightness 0.851 -> 0.857 at 3e-5 in 6 epochs, 0.849 in 12, 0.851 at
    # 6e-5, 0.815 at 1e-4 (on the verifier: score 0.889 -> 0.925, accuracy +2 / 64); open, as D3PO below
    pytest.param("mapo", {**{k: v for k, v in PAIR_RUN.items() if k != "beta"}, "train_guidance_scale": 3.0}, 3e-5,
                 12, marks=pytest.mark.xfail(strict=True, reason="MaPO does not raise brightness on the shipped base")),
    ("npo", PAIR_RUN, 3e-5, None),
    # v2 base: D3PO darkens the images it should brighten (0.857 -> 0.818 at lr 1e-4; 0.851 at 3e-5, 0.818 at
    # 3e-4, 0.798 in 12 epochs, 0.855 with groups of 4, 0.819 with beta 1, the same on its SDE samples) where
    # it brightened the v1 base (0.854 -> 0.887): open, see docs/algorithms/preference.md
    pytest.param("d3po", {"prompts_per_epoch": 8, "group_size": 2, "timestep_fraction": 0.5}, 1e-4, None,
                 marks=pytest.mark.xfail(strict=True, reason="D3PO lowers brightness on the v2 and the shipped shapes-flow")),
])
def test_it_learns_an_easy_reward_on_the_shapes_world(method, extra, lr, epochs, tmp_path):
    """MaPO, Diffusion-NPO and D3PO do not raise the verifier score in a CI-sized run (measured in
    docs/algorithms/preference.md); here they learn the brightness of the images instead."""
    tuned = train_on_subset(method, "brightness", lr, extra, tmp_path, epochs=epochs)
    base = load_model("shapes-flow").eval()
    before = brightness(base)
    after = brightness(base, negative_model=tuned) if method == "npo" else brightness(tuned)
    assert after > before + 0.01, (before, after)


# ----- a real pipeline (tiny random SD 1.5 in diffusers' own classes) -------------------------------------
@pytest.mark.parametrize("method,extra", [("dpo", {"source": "reference"}), ("mapo", {}), ("d3po", {})])
def test_methods_train_a_diffusers_sd15_pipeline_with_lora(method, extra, tmp_path):
    pytest.importorskip("diffusers")
    from tiny_pipelines import build_sd

    sd = build_sd(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    small = {"num_steps": 2, "guidance_scale": 2.0}
    small.update({"prompts_per_epoch": 2, "sampler": "ddim", "eta": 1.0} if method in STEPWISE else
                 {"pairs_per_epoch": 2, "group_size": 2, "micro_batch_size": 2})
    cfg = TrainConfig(model=str(sd), method=method, reward="brightness", epochs=2, lr=1e-2, lora_rank=4,
                      checkpoint_every=10, prompts=PromptsConfig(file=str(tmp_path / "prompts.txt")),
                      algorithm={**small, **extra})
    final = train(cfg, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in rows(tmp_path / "run") if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert (final / "lora").is_dir()
