"""Inference-time search (diffalign.search): budgets, NFE accounting, determinism, the FK-steering
invariants, reward improvement, bad input and the CLI. Tiny random models, a few steps each."""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffalign import rewards, search
from diffalign.core.sampling import sample
from diffalign.search.base import candidate_generator
from test_online_rl import tiny_model

PROMPTS = ["two red circles", "a blue square left of a green triangle"]
T = 3  # sampling steps in these tests




@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tuned():
    return tiny_model(seed=1)


def run(name, model, tuned, reward="shapes_soft", budget=2 * 2 * 4 * T, **kw):
    extra = {"tuned": tuned} if name == "rlg" else {}
    return search.run(name, model, PROMPTS, reward, budget=budget, num_images_per_prompt=2, num_steps=T, **extra, **kw)


class RowCounter:
    """Counts the rows the UNet really runs on (a forward hook, independent of the search code)."""

    def __init__(self, *models):
        self.rows = 0
        self.handles = [m.unet.register_forward_hook(self.hook) for m in models]

    def hook(self, module, args, output):
        self.rows += args[0].shape[0]

    def close(self):
        for h in self.handles:
            h.remove()


# ----- every method ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(search.METHODS))
def test_every_method_counts_nfe_honestly_and_is_deterministic(name, model, tuned):
    budget = 2 * 2 * 4 * T  # 4 samples' worth for each of the 4 images
    counter = RowCounter(model, tuned)
    try:
        a = run(name, model, tuned, budget=budget, seed=5)
    finally:
        counter.close()
    assert a.images.shape == (4, 3, 32, 32) and a.scores.shape == (4,)
    assert 0 <= float(a.images.min()) and float(a.images.max()) <= 1
    assert a.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 and a.seeds == [5, 6, 7, 8]
    assert 0 < a.nfe <= budget
    assert a.nfe == counter.rows // 2  # guidance 3: both CFG branches run, counted as one evaluation
    # the returned scores are the reward of the returned images
    r = rewards.get("shapes_soft")(a.images, a.prompts)
    assert torch.allclose(a.scores, r, atol=1e-4)
    b = run(name, model, tuned, budget=budget, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.scores, b.scores) and a.nfe == b.nfe
    c = run(name, model, tuned, budget=budget, seed=6)
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("name", sorted(search.METHODS))
def test_budget_below_one_sample_names_the_minimum(name, model, tuned):
    per_image = {"rlg": 2 * T, "beam": search.lookahead_cost(T, 2, 1, 1, 2)}.get(name, T)
    minimum = 4 * per_image
    with pytest.raises(ValueError, match=f"below the minimum of {minimum} NFE"):
        run(name, model, tuned, budget=minimum - 1)
    run(name, model, tuned, budget=minimum)  # exactly the minimum is fine


@pytest.mark.parametrize("name", search.GRADIENT_METHODS)
def test_gradient_methods_refuse_non_differentiable_rewards(name, model, tuned):
    with pytest.raises(ValueError, match=rf"{name} follows the reward's gradient, but reward 'shapes' is not"):
        run(name, model, tuned, reward="shapes")


@pytest.mark.parametrize("name,option", [("best_of_n", "n"), ("smc", "num_particles"), ("beam", "num_candidates"),
                                         ("svdd", "num_candidates"), ("code", "num_candidates"),
                                         ("beam", "beam_width")])
def test_fewer_than_one_candidate_is_rejected(name, option, model, tuned):
    with pytest.raises(ValueError, match=f"{option} must be an integer in \\[1, inf\\), got 0"):
        run(name, model, tuned, **{option: 0})


def test_unknown_options_and_methods(model, tuned):
    with pytest.raises(ValueError, match="unknown option.*num_particle'.*num_particles"):
        run("smc", model, tuned, num_particle=3)
    with pytest.raises(ValueError, match="unknown search method 'mcts'"):
        search.run("mcts", model, PROMPTS, "shapes", budget=100)
    with pytest.raises(ValueError, match="needs a stochastic sampler"):
        run("smc", model, tuned, sampler="flow_ode")


# ----- best-of-N and reward selection ---------------------------------------------------------


def test_best_of_n_picks_the_best_candidate(model, tuned):
    res = run("best_of_n", model, tuned, reward="brightness", budget=4 * 6 * T)
    cand = res.trace["candidate_scores"]
    assert cand.shape == (4, 6)
    assert torch.equal(res.scores, cand.max(dim=1).values)
    assert (res.scores >= cand.mean(dim=1)).all() and (res.scores > cand.mean(dim=1)).any()


def test_smc_with_lambda_zero_is_independent_sampling(model, tuned):
    res = run("smc", model, tuned, lam=0.0, num_particles=3, keep_particles=True, seed=2, budget=4 * 3 * T)
    assert res.trace["num_resamples"] == 0
    cond = model.encode_prompts([PROMPTS[0]])
    uncond = model.encode_prompts([""])
    for i in range(2):  # both images of the first prompt
        for k in range(3):
            g = candidate_generator(2 + i, k)
            noise = torch.randn((1, 3, 32, 32), generator=g)
            with torch.no_grad():
                x0 = sample(model, cond, sampler="flow_sde", num_steps=T, guidance_scale=3.0, noise=noise,
                            uncond=uncond, eta=0.7, generator=g).x0
            assert torch.allclose(res.trace["particles"][i, k], model.decode(x0)[0], atol=1e-5)
    # and those are exactly best-of-N's candidates with the same sampler
    bon = run("best_of_n", model, tuned, n=3, sampler="flow_sde", seed=2, budget=4 * 3 * T)
    assert torch.allclose(bon.trace["candidate_scores"], res.trace["particle_scores"], atol=1e-6)


def test_ess_on_hand_made_weights():
    assert search.ess(torch.full((7,), 0.3)).item() == pytest.approx(7.0)
    assert search.ess(torch.tensor([0.0, 1.0, 0.0, 0.0])).item() == pytest.approx(1.0)
    assert search.ess(torch.tensor([0.5, 0.5, 0.0, 0.0])).item() == pytest.approx(2.0)
    logw = torch.tensor([[0.0, 0.0, 0.0], [0.0, -float("inf"), -float("inf")]])
    assert torch.allclose(search.ess(logw, log=True), torch.tensor([3.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("method", ["multinomial", "systematic"])
def test_resampling_is_unbiased(method):
    w = torch.tensor([0.1, 0.6, 0.05, 0.25])
    K, reps = 4, 3000
    gens = [torch.Generator().manual_seed(i) for i in range(reps)]
    anc = search.resample(torch.log(w).expand(reps, K), method, gens)
    freq = torch.bincount(anc.flatten(), minlength=K).double() / (reps * K)
    # each ancestor count is a sum of bounded draws: 5 standard errors of the multinomial case
    assert torch.allclose(freq, w.double(), atol=5 * (0.25 / (reps * K)) ** 0.5)
    if method == "systematic":  # counts within one of K w_i
        counts = torch.stack([torch.bincount(a, minlength=K) for a in anc]).double()
        assert ((counts - K * w).abs() < 1).all()
    uniform = search.resample(torch.zeros(1, K), method, [torch.Generator().manual_seed(0)])
    if method == "systematic":
        assert uniform.tolist() == [[0, 1, 2, 3]]


def test_smc_resamples_and_keeps_weights_normalised(model, tuned):
    res = run("smc", model, tuned, reward="brightness", lam=200.0, num_particles=4, ess_threshold=1.0,
              potential="difference", budget=4 * 4 * T)
    assert res.trace["num_resamples"] > 0
    w = res.trace["weights"]
    assert torch.allclose(w.sum(dim=1), torch.ones(4), atol=1e-6) and (w >= 0).all()
    ess = res.trace["ess"]
    assert ((ess[~torch.isnan(ess)] >= 1 - 1e-9) & (ess[~torch.isnan(ess)] <= 4 + 1e-9)).all()
    for pot in ("max", "sum"):
        r = run("smc", model, tuned, reward="brightness", lam=50.0, num_particles=4, potential=pot,
                resampler="multinomial", resample_every=2, budget=4 * 4 * T)
        assert torch.allclose(r.trace["weights"].sum(dim=1), torch.ones(4), atol=1e-6)


def test_reward_guided_methods_beat_independent_sampling(model, tuned):
    """On brightness, each selecting method's mean reward beats that of plain samples at the same seeds."""
    base = run("smc", model, tuned, reward="brightness", lam=0.0, num_particles=1, budget=4 * T)
    budget = 4 * 6 * T
    for name, kw in [("best_of_n", {}), ("smc", {"lam": 100.0}), ("svdd", {}), ("beam", {"lookahead_steps": 1}),
                     ("code", {"block_size": 1}), ("dts", {})]:
        res = run(name, model, tuned, reward="brightness", budget=budget, **kw)
        assert res.scores.mean() > base.scores.mean(), name


def test_beam_cost_formula_is_what_is_spent(model, tuned):
    for B, K, k, L in [(2, 2, 1, 2), (1, 3, 2, 1), (2, 1, 3, 3)]:
        cost = search.lookahead_cost(T, B, K, k, L)
        res = run("beam", model, tuned, beam_width=B, num_candidates=K, block_size=k, lookahead_steps=L,
                  budget=4 * cost)
        assert res.nfe == 4 * cost


def test_tree_search_reuses_prefixes(model, tuned):
    res = run("dts", model, tuned, reward="brightness", budget=4 * 6 * T)
    assert res.trace["nfe_saved"] > 0
    assert (res.trace["rollouts"] > 6).all()  # more complete samples than 6 independent ones would allow
    for hist in res.trace["best_by_rollout"]:
        assert hist == sorted(hist)  # the best reward found never drops
    s = run("dts", model, tuned, reward="brightness", budget=4 * 6 * T, mode="sample", lam=5.0)
    assert s.nfe <= 4 * 6 * T


# ----- noise optimisation --------------------------------------------------------------------


@pytest.mark.parametrize("reward", ["brightness", "shapes_soft"])
def test_reno_raises_the_reward_on_every_prompt(model, tuned, reward):
    res = run("reno", model, tuned, reward=reward, budget=4 * 5 * T)
    hist = res.trace["reward_by_iteration"]
    assert hist.shape == (5, 4) and res.trace["backward_nfe"] == 4 * 4 * T
    assert (res.scores > hist[0]).all()


def test_dno_and_mira_raise_the_reward(model, tuned):
    for name in ("dno", "mira"):
        res = run(name, model, tuned, reward="brightness", budget=4 * 5 * T, lr=0.05, kl_weight=0.0)
        assert (res.scores > res.trace["reward_by_iteration"][0]).all(), name
    assert run("dno", model, tuned, reward="brightness").trace["optimised"] == "all noise"


def test_mira_kl_keeps_the_image_near_the_frozen_sample(model, tuned):
    kw = dict(reward="brightness", budget=4 * 6 * T, lr=0.1, seed=3)
    start = run("mira", model, tuned, iterations=1, **kw).images
    free = run("mira", model, tuned, kl_weight=0.0, **kw).images
    tied = run("mira", model, tuned, kl_weight=1e4, **kw).images
    assert (tied - start).pow(2).mean() < 0.25 * (free - start).pow(2).mean()


def test_noise_regularisers():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, 32, 32, generator=g)
    reg = search.dno_probability_regularizer(z, 16, torch.Generator().manual_seed(1))
    assert (reg < 1.0).all()
    assert (search.dno_probability_regularizer(1.5 * z, 16, g) > 20).all()  # too large a variance
    assert (search.dno_probability_regularizer(z + 0.3, 16, g) > 20).all()  # a mean shift
    d = 3 * 32 * 32
    nll = search.chi_nll(torch.stack([z[0], z[0] * 0.5, z[0] * 2]))
    assert nll[0] < nll[1] and nll[0] < nll[2]
    assert search.chi_nll(torch.ones(1, d) * ((d - 1) / d) ** 0.5) <= nll[0]


# ----- RLG -------------------------------------------------------------------------------------


def test_rlg_mixes_raw_predictions(model, tuned):
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        cond = model.encode_prompts(PROMPTS)
        ob, ot = model(x, t, cond), tuned(x, t, tuned.encode_prompts(PROMPTS))
        for w in (0.0, 1.0, 2.5):
            mix = search.RLGDenoiser(model, tuned, w)
            assert torch.allclose(mix(x, t, mix.encode_prompts(PROMPTS)), ob + w * (ot - ob), atol=1e-6)
    vp = tiny_model("epsilon", seed=2)
    with pytest.raises(ValueError, match="share a noise schedule"):
        search.RLGDenoiser(model, vp, 1.0)


def test_rlg_endpoints_are_the_two_models(model, tuned, tmp_path):
    base = run("best_of_n", model, tuned, n=1, seed=4, budget=4 * T)
    at0 = run("rlg", model, tuned, weight=0.0, n=1, seed=4, budget=4 * 2 * T)
    assert at0.nfe == 4 * 2 * T
    assert torch.allclose(at0.images, base.images, atol=1e-5)
    tuned.save_pretrained(tmp_path / "run" / "final")  # a `diffalign train` run directory
    by_dir = search.rlg(model, tmp_path / "run", PROMPTS, "shapes_soft", weight=1.0, n=1, seed=4, budget=2 * 2 * T,
                        num_steps=T)
    alone = search.best_of_n(tuned, PROMPTS, "shapes_soft", n=1, seed=4, budget=2 * T, num_steps=T)
    assert torch.allclose(by_dir.images, alone.images, atol=1e-5)


# ----- the CLI ---------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "diffalign", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_search_cli_writes_what_it_promises(tmp_path, model, tuned):
    model.save_pretrained(tmp_path / "model")
    tuned.save_pretrained(tmp_path / "tuned")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("two red circles\n\na blue square above a green triangle\n")
    out = _cli("search", "--method", "smc", "--budget", str(4 * 3 * 2), "--model", str(tmp_path / "model"),
               "--reward", "shapes", "--prompts", str(prompts), "-k", "2", "--out", str(tmp_path / "out"),
               "--seed", "3", "--steps", "2", "--set", "num_particles=3", "--set", "potential=difference")
    assert out.returncode == 0, out.stderr
    assert "spent 24 of 24 NFE" in out.stdout and "exact accuracy" in out.stdout
    lines = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["two red circles"] * 2 + ["a blue square above a green triangle"] * 2
    assert [r["seed"] for r in lines] == [3, 4, 5, 6]
    for r in lines:
        assert (tmp_path / "out" / r["file"]).is_file()
        assert 0 <= r["score"] <= 1 and r["score"] == pytest.approx(r["verifier_score"], abs=1e-6)
        assert isinstance(r["correct"], bool)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["nfe"] == 24 and summary["method"] == "smc" and summary["trace"]["num_particles"] == 3

    out = _cli("search", "--method", "rlg", "--budget", "8", "--model", str(tmp_path / "model"), "--tuned",
               str(tmp_path / "tuned"), "--weight", "2", "--reward", "brightness", "--prompt", "red blue green",
               "--out", str(tmp_path / "rlg"), "--steps", "2")
    assert out.returncode == 0, out.stderr
    rec = json.loads((tmp_path / "rlg" / "samples.jsonl").read_text())
    assert set(rec) == {"file", "prompt", "seed", "score"} and "spent 8 of 8 NFE" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--method", "smc", "--budget", "3"], "smc: budget 3 NFE is below the minimum of 4 NFE"),
    (["--method", "reno", "--budget", "40"], "reno follows the reward's gradient, but reward 'shapes' is not"),
    (["--method", "astar", "--budget", "40"], "unknown method 'astar'"),
    (["--method", "smc", "--budget", "40", "--set", "num_particles=0"], "num_particles must be an integer in [1, inf)"),
    (["--method", "rlg", "--budget", "40"], "rlg needs --tuned DIR"),
])
def test_search_cli_bad_input(tmp_path, model, args, message):
    model.save_pretrained(tmp_path / "model")
    out = _cli("search", "--model", str(tmp_path / "model"), "--reward", "shapes", "--prompt", "one red circle",
               "--out", str(tmp_path / "o"), "--steps", "4", *args)
    assert out.returncode != 0 and message in out.stderr, out.stderr


@pytest.mark.parametrize("name", ["smc", "dts", "dno"])
def test_vp_models_get_the_ddpm_sampler(name, tuned):
    vp = tiny_model("epsilon", seed=3)
    res = search.run(name, vp, PROMPTS, "brightness", budget=2 * 2 * T, num_steps=T)
    assert res.trace["sampler"] == "ddim" and res.trace["eta"] == 1.0 and 0 < res.nfe <= 2 * 2 * T


@pytest.mark.parametrize("name,kw", [("svdd", {"alpha": 0.05}), ("smc", {"select": "sample", "lam": 20.0}),
                                     ("dts", {"mode": "sample", "lam": 5.0})])
def test_stochastic_selection_is_seeded(name, kw, model, tuned):
    a = run(name, model, tuned, reward="brightness", seed=9, **kw)
    b = run(name, model, tuned, reward="brightness", seed=9, **kw)
    assert torch.equal(a.images, b.images)
