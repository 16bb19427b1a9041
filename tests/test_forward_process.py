"""Likelihood-free online RL on the forward process: DiffusionNFT, AWM, CRD."""

import json

import pytest
import torch
from test_online_rl import tiny_model, verifier_reward

from diffalign import algorithms
from diffalign.algorithms._rollout import group_advantages
from diffalign.algorithms.crd import centred_by_group, crd_loss
from diffalign.algorithms.forward_process import (
    ForwardProcessConfig,
    awm_loss,
    matching_loss,
    nft_loss,
    optimality_probability,
    sample_times,
)
from diffalign.core.parametrization import to_x0_eps
from diffalign.models import load_model
from diffalign.runtime.prompts import PromptsConfig
from diffalign.runtime.trainer import TrainConfig, train

TIMING = {"sample_s", "train_s", "images_per_s", "elapsed_s"}
METHODS = ["diffusion_nft", "awm", "crd"]


def flow_tensors(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 3, 4, 4, generator=g)
    t = torch.rand(n, generator=g) * 0.8 + 0.1
    alpha, sigma = 1 - t, t
    x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    return x0, eps, x_t, alpha, sigma


# ----- losses on hand-made tensors ----------------------------------------------------------------
def test_nft_loss_matches_its_definition():
    x0, eps, x_t, alpha, sigma = flow_tensors()
    pred, pred_old = torch.randn_like(x0), torch.randn_like(x0)
    r, beta = torch.tensor([0.1, 0.5, 0.7, 1.0]), 0.5
    got = nft_loss(pred, pred_old, x0, x_t, alpha, sigma, r, beta, "flow", adaptive_weight=False)
    pos, neg = (1 - beta) * pred_old + beta * pred, (1 + beta) * pred_old - beta * pred
    s = sigma.view(-1, 1, 1, 1)
    e_pos = ((x_t - s * pos - x0) ** 2).mean(dim=(1, 2, 3))  # flow: x0_hat = x_t - t v
    e_neg = ((x_t - s * neg - x0) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, (r * e_pos + (1 - r) * e_neg) / beta)
    # the adaptive weight divides each error by its (detached) mean absolute value
    got_w = nft_loss(pred, pred_old, x0, x_t, alpha, sigma, r, beta, "flow")
    x0_pos, _ = to_x0_eps(pos, x_t, alpha, sigma, "flow")
    w_pos = (x0_pos - x0).abs().mean(dim=(1, 2, 3))
    x0_neg, _ = to_x0_eps(neg, x_t, alpha, sigma, "flow")
    w_neg = (x0_neg - x0).abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(got_w, (r * e_pos / w_pos + (1 - r) * e_neg / w_neg) / beta)


@pytest.mark.parametrize("adaptive", [True, False])
def test_nft_with_no_preference_gives_zero_gradient(adaptive):
    x0, eps, x_t, alpha, sigma = flow_tensors(1)
    pred_old = torch.randn_like(x0)
    pred = pred_old.clone().requires_grad_(True)  # the policy equals the old policy (start of an epoch)
    r = torch.full((4,), 0.5)
    nft_loss(pred, pred_old, x0, x_t, alpha, sigma, r, 1.0, "flow", adaptive).sum().backward()
    assert pred.grad.abs().max() < 1e-6
    # a preference does move it: r > 1/2 pulls x0(v_theta) towards the sample
    pred.grad = None
    nft_loss(pred, pred_old, x0, x_t, alpha, sigma, torch.full((4,), 0.9), 1.0, "flow", adaptive).sum().backward()
    assert pred.grad.abs().max() > 1e-4


def test_optimality_probability_maps_advantages_into_unit_interval():
    r = optimality_probability(torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0]))
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))


def test_awm_loss_is_advantage_weighted_matching_and_its_clip():
    l_old = torch.tensor([0.5, 0.5, 0.5])
    l = l_old.clone().requires_grad_(True)
    adv, w = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([1.0, 0.5, 2.0])
    torch.testing.assert_close(awm_loss(l, l_old, adv, w, 0.0), adv * w * l)
    # clipped form: same gradient at rho = 1 ...
    awm_loss(l, l_old, adv, w, 0.1).sum().backward()
    torch.testing.assert_close(l.grad, adv * w)
    # ... and none once the ratio has left the clip range in the advantage's direction
    l2 = (l_old - torch.tensor([0.5, -0.5, 0.0])).requires_grad_(True)  # rho = e^0.5 (A>0), e^-0.25 (A<0), 1
    awm_loss(l2, l_old, adv, w, 0.1).sum().backward()
    assert l2.grad[0] == 0 and l2.grad[1] == 0 and l2.grad[2] != 0


def test_awm_with_equal_advantages_gives_zero_policy_gradient():
    rewards = torch.tensor([0.7] * 4 + [0.2] * 4)  # every group's rewards equal
    adv = group_advantages(rewards, torch.arange(2).repeat_interleave(4))
    pred = torch.randn(8, 3, 4, 4, requires_grad=True)
    target = torch.randn(8, 3, 4, 4)
    l = matching_loss(pred, target)
    awm_loss(l, l.detach(), adv, torch.ones(8), 0.0).sum().backward()
    assert pred.grad.abs().max() == 0


def test_crd_is_unchanged_by_a_constant_added_to_one_prompts_rewards():
    group = torch.arange(2).repeat_interleave(4)
    rewards = torch.tensor([0.1, 0.4, 0.9, 0.3, 0.5, 0.2, 0.8, 0.6])
    l_old = torch.rand(8) + 0.5
    l = (l_old + 0.1 * torch.randn(8)).requires_grad_(True)
    shifted = rewards + torch.tensor([0.0] * 4 + [3.0] * 4)
    a = crd_loss(l, l_old, group_advantages(rewards, group, std=False), group, 2.0)
    b = crd_loss(l, l_old, group_advantages(shifted, group, std=False), group, 2.0)
    torch.testing.assert_close(a, b)
    # and a constant shift of the implicit rewards within a group cancels too (the normaliser log Z)
    c = crd_loss(l + l_old.detach() * 0.3 * (group == 1), l_old, group_advantages(rewards, group, std=False), group, 2.0)
    torch.testing.assert_close(a, c)
    # the loss is zero exactly when the centred implicit reward equals the centred advantage / tau
    adv = group_advantages(rewards, group, std=False)
    l_star = l_old * (1 - centred_by_group(adv, group) / 2.0)  # rho = -(l - l_old)/l_old = A_c / tau
    assert crd_loss(l_star, l_old, adv, group, 2.0).abs().max() < 1e-10


def test_logit_normal_times_stay_in_their_interval():
    cfg = ForwardProcessConfig(t_dist="logit_normal", t_min=0.6, t_max=0.95)
    t = sample_times(2000, cfg, torch.Generator().manual_seed(0))
    assert t.min() >= 0.6 and t.max() <= 0.95 and t.std() > 0.05


# ----- the algorithms on a tiny model -------------------------------------------------------------
def build(method, **overrides):
    cfg = algorithms.build_config(method, {"group_size": 4, "batch_size": 8, "num_steps": 3, "micro_batch_size": 8,
                                           **overrides})
    return cfg, algorithms.get(method)[1]


@pytest.mark.parametrize("method", METHODS)
def test_rollouts_keep_final_samples_only_and_any_sampler_works(method):
    model = tiny_model()
    for sampler in ("flow_ode", "flow_sde"):
        cfg, cls = build(method, sampler=sampler, beta=0.0)
        algo = cls(cfg, reward=verifier_reward)
        batch = algo.collect(model, ["two red circles", "a blue square"], epoch=0, seed=3)
        assert batch.latents.shape == (8, 3, 32, 32)
        assert torch.isfinite(batch.advantages).all()
        micro = next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0))))
        assert sum(len(m.idx) for m in micro) == 8 * cfg.timesteps_per_sample
        loss, stats = algo.loss(model.train(), micro[0])
        loss.backward()
        assert torch.isfinite(loss) and "policy_loss" in stats
        model.zero_grad()


def test_crd_micro_batches_hold_whole_groups_at_a_shared_noise_draw():
    model = tiny_model()
    cfg, cls = build("crd", beta=0.0, timesteps_per_sample=2, micro_batch_size=4)
    algo = cls(cfg, reward=verifier_reward)
    batch = algo.collect(model, ["two red circles", "a blue square"], epoch=0, seed=3)
    for micro in next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0)))):
        assert len(micro.unit.unique()) == 1  # one group, one (t, eps)
        assert len(batch.group[micro.idx].unique()) == 1
        assert len(micro.t.unique()) == 1 and all(torch.equal(micro.noise[0], n) for n in micro.noise)


@pytest.mark.parametrize("method", ["diffusion_nft", "awm"])
def test_skip_zero_std_groups_trains_only_groups_whose_rewards_differ(method):
    model = tiny_model()
    cfg, cls = build(method, beta=0.0, steps_per_epoch=2, micro_batch_size=4)
    skip_cfg, _ = build(method, beta=0.0, steps_per_epoch=2, micro_batch_size=4, skip_zero_std_groups=True)
    batch = cls(cfg, reward=verifier_reward).collect(model, ["two red circles", "a blue square"], epoch=0, seed=3)
    batch.rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.2, 0.9, 0.9, 0.9])  # group 0 uniform, group 1 not
    batch.valid = torch.ones(8, dtype=torch.bool)

    def planned(c):
        steps = list(cls(c, reward=verifier_reward).minibatches(batch, torch.Generator().manual_seed(0)))
        return [torch.cat([m.idx for m in step]) for step in steps]

    everything, informative = planned(cfg), planned(skip_cfg)
    assert sorted(torch.cat(everything).unique().tolist()) == list(range(8))
    assert sorted(torch.cat(informative).unique().tolist()) == [4, 5, 6, 7]
    assert len(informative) == 2 and all(len(s) == 2 * cfg.timesteps_per_sample for s in informative)
    fresh = cls(skip_cfg, reward=verifier_reward).collect(model, ["two red circles", "a blue square"], epoch=0, seed=3)
    differs = [bool((r[v] != r[v][0]).any()) if v.sum() > 1 else False  # per group of 4, by hand
               for r, v in zip(fresh.rewards.view(2, 4), fresh.valid.view(2, 4))]
    assert fresh.info["trained_fraction"] == sum(differs) / 2
    # a failed sample does not make its group informative; an all-uniform batch plans no step
    batch.rewards, batch.valid = torch.tensor([1.0] * 4 + [0.5, 0.5, 0.5, 0.0]), torch.tensor([True] * 7 + [False])
    assert planned(skip_cfg) == []


def test_old_policy_follows_its_decay_schedule():
    model = tiny_model()
    cfg, cls = build("awm", decay_start=0.5, decay_max=0.5)
    algo = cls(cfg, reward=verifier_reward)
    algo.old.update(model, cfg.decay(0))
    name, p = next((k, v) for k, v in model.named_parameters() if v.requires_grad)
    before = algo.old.params[name].clone()
    with torch.no_grad():
        p.add_(1.0)
    algo.old.update(model, cfg.decay(1))
    torch.testing.assert_close(algo.old.params[name], before + 0.5)


@pytest.mark.parametrize("overrides,message", [
    ({"t_min": 0.8, "t_max": 0.5}, "t_min"),
    ({"t_dist": "beta"}, "t_dist"),
    ({"sampler": "euler"}, "sampler"),
    ({"batch_size": 10}, "multiple of group_size"),
    ({"decay_max": 1.0}, "decay_max"),
    ({"sample_with": "ema"}, "sample_with"),
    ({"x0_clip": -1.0}, "x0_clip"),
    ({"negative_weight": 2.0}, "negative_weight"),
    ({"pretrain_weight": -1.0}, "pretrain_weight"),
    ({"uncond_weight": -0.5}, "uncond_weight"),
    ({"uncond_weight": 1.0, "train_guidance_scale": 3.0}, "uncond_weight=1.0 .*needs train_guidance_scale: 1"),
])
def test_bad_forward_process_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        algorithms.build_config("awm", {"group_size": 4, **overrides})


def test_bad_method_specific_fields():
    with pytest.raises(ValueError, match="nft_beta"):
        algorithms.build_config("diffusion_nft", {"nft_beta": 0.0})
    with pytest.raises(ValueError, match="weighting"):
        algorithms.build_config("awm", {"weighting": "huber2"})
    with pytest.raises(ValueError, match="whole groups|multiple of group_size"):
        algorithms.build_config("crd", {"group_size": 4, "batch_size": 8, "micro_batch_size": 6})
    with pytest.raises(ValueError, match="unknown"):
        algorithms.build_config("crd", {"crd_temperature": 1.0})
    with pytest.raises(ValueError, match="skip_zero_std_groups=True is not supported by CRD"):
        algorithms.build_config("crd", {"group_size": 4, "batch_size": 8, "skip_zero_std_groups": True})


# ----- runtime: resume ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_flow_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp_models") / "flow"
    tiny_model("flow").save_pretrained(d)
    return d


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", METHODS)
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny_flow_dir, tmp_path, method):
    algo = {"group_size": 4, "batch_size": 8, "num_steps": 3, "micro_batch_size": 8, "decay_slope": 0.2,
            "decay_max": 0.6}
    cfg = TrainConfig(model=str(tiny_flow_dir), method=method, algorithm=algo, epochs=4, checkpoint_every=2,
                      lr=1e-3)
    final = train(cfg, tmp_path / "full", progress=False)
    assert train(cfg, tmp_path / "cut", progress=False, stop_at=3) is None
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert rows(tmp_path / "full") == rows(tmp_path / "cut")
    a, b = load_model(final), load_model(resumed)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_guided_training_with_a_detached_unconditional_branch_trains_through_the_conditional_one():
    model = tiny_model()
    cfg, cls = build("awm", train_guidance_scale=3.0)
    algo = cls(cfg, reward=verifier_reward)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0.7, 0.4])
    with torch.no_grad():
        cond, uncond = model.encode_prompts(["two red circles", "a blue square"]), model.encode_prompts(["", ""])
    params = list(model.unet.parameters())
    g_detached = torch.autograd.grad(algo.predict(model, x, t, cond, uncond, 3.0, True).sum(), params)
    g_cond = torch.autograd.grad(3.0 * model(x, t, cond).sum(), params)
    for a, b in zip(g_detached, g_cond):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    g_full = torch.autograd.grad(algo.predict(model, x, t, cond, uncond, 3.0, False).sum(), params)
    assert max((a - b).abs().max().item() for a, b in zip(g_full, g_cond)) > 1e-2


def test_negative_weight_scales_only_negative_advantages():
    model = tiny_model()
    cfg, cls = build("awm", negative_weight=0.0)
    batch = cls(cfg, reward=verifier_reward).collect(model, ["two red circles", "a blue square"], epoch=0, seed=3)
    assert (batch.advantages >= 0).all() and (batch.advantages > 0).any()


def test_x0_clip_clamps_the_training_samples_to_the_decoded_range():
    model = tiny_model()
    cfg, cls = build("awm", x0_clip=0.5)
    batch = cls(cfg, reward=verifier_reward).collect(model, ["two red circles", "a blue square"], epoch=0, seed=3)
    assert batch.latents.abs().max() <= 0.5


@pytest.mark.parametrize("method", METHODS)
def test_pretrain_regulariser_adds_the_denoising_loss_on_renders(method):
    from diffalign.core.parametrization import from_x0_eps
    from diffalign.worlds import shapes

    model = tiny_model().train()
    prompts = ["two red circles", "a blue square left of a red circle"]
    cfg, cls = build(method, beta=0.0, pretrain_weight=0.5)
    plain_cfg, _ = build(method, beta=0.0)
    algo, plain = cls(cfg, reward=verifier_reward), cls(plain_cfg, reward=verifier_reward)
    plain.old = algo.old  # the same old policy (collect sets it)
    batch = algo.collect(model, prompts, epoch=0, seed=3)
    micro = next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0))))[0]
    seed, t, eps = micro.reg
    assert t.shape == (len(micro.idx),) and eps.shape == (len(micro.idx), 3, 32, 32)
    loss, stats = algo.loss(model, micro)
    base, _ = plain.loss(model, micro)
    # by hand: renders of the micro-batch's prompts, noised at the drawn t, the velocity target
    images, _ = shapes.render_batch([batch.prompts[i] for i in micro.idx.tolist()], seed=seed)
    x0 = model.encode_images(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    tt = t.clamp_min(1e-4)
    alpha, sigma = model.schedule.alpha_sigma(tt)
    alpha, sigma = alpha.float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)
    cond = model.encode_prompts([batch.prompts[i] for i in micro.idx.tolist()])
    pred = model(alpha * x0 + sigma * eps, tt, cond)
    want = ((pred - from_x0_eps(x0, eps, alpha, sigma, "flow")) ** 2).mean()
    torch.testing.assert_close(stats["pretrain_loss"], want.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, base + 0.5 * want, rtol=1e-4, atol=1e-6)
    # off: nothing drawn, so the generator's stream (and every existing run) is unchanged
    assert next(iter(plain.minibatches(batch, torch.Generator().manual_seed(0))))[0].reg is None
    batch.prompts = ["red circle left"] * len(batch)  # in the vocabulary, not a world prompt: nothing to render
    with pytest.raises(ValueError, match="renders shapes-world prompts"):
        algo.loss(model, micro)


@pytest.mark.parametrize("method", ["diffusion_nft", "awm"])
def test_uncond_weight_adds_the_same_policy_loss_on_the_empty_prompt(method):
    """``uncond_weight`` trains the unconditional branch on the same noised samples and advantages, so a
    prompt-independent change (say, larger objects) moves both branches and is not multiplied by the
    guidance scale at sampling (docs/shapes.md, "The demo on the shipped base")."""
    model = tiny_model().train()
    prompts = ["two red circles", "a blue square left of a red circle"]
    cfg, cls = build(method, beta=0.0, uncond_weight=0.5)
    plain_cfg, _ = build(method, beta=0.0)
    algo, plain = cls(cfg, reward=verifier_reward), cls(plain_cfg, reward=verifier_reward)
    plain.old = algo.old
    batch = algo.collect(model, prompts, epoch=0, seed=3)
    assert batch.uncond is not None  # the empty prompt's encoding is built for it
    micro = next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0))))[0]
    loss, stats = algo.loss(model, micro)
    base, _ = plain.loss(model, micro)
    # by hand: the policy loss with the empty prompt's encoding in place of the prompts'
    x0, x_t, t, _, uncond, target, alpha_sigma = algo.noised(model, micro)
    with torch.no_grad():
        old_u = algo.old.bind(model)(x_t, t, uncond)
    adv = batch.advantages[micro.idx]
    per_u, _ = algo.policy_loss(model(x_t, t, uncond), old_u, target, x0, x_t, alpha_sigma, t, adv, micro, model)
    torch.testing.assert_close(stats["uncond_loss"], per_u.mean().detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, base + 0.5 * per_u.mean(), rtol=1e-4, atol=1e-6)
    assert abs(per_u.mean().item()) > 0  # a live term, not a zero
    assert plain_cfg.uncond_weight == 0.0  # off by default: every existing run unchanged


# ----- it learns ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_it_learns_to_raise_a_reward_on_fixed_prompts(tiny_flow_dir, tmp_path, method):
    """A CI-sized run with ODE rollouts raises the (image-statistics) reward of fixed-seed samples of
    the training prompts clearly above the same samples of the base model."""
    from diffalign import rewards
    from diffalign.core.sampling import generate

    prompts = ["two red circles", "a blue square left of a green triangle"]
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("\n".join(prompts) + "\n")
    algo = {"group_size": 8, "batch_size": 16, "num_steps": 4, "micro_batch_size": 16, "guidance_scale": 1.0,
            "timesteps_per_sample": 2, "steps_per_epoch": 2}
    cfg = TrainConfig(model=str(tiny_flow_dir), method=method, reward="brightness", algorithm=algo, epochs=12,
                      lr=3e-3, prompts=PromptsConfig(file=str(pfile)), checkpoint_every=100)
    final = train(cfg, tmp_path / "run", progress=False)
    reward = rewards.get("brightness")

    def score(model_dir):
        model = load_model(model_dir).eval()
        with torch.no_grad():
            images = generate(model, prompts * 8, list(range(16)), sampler="flow_ode", num_steps=4, guidance_scale=1.0)
        return reward(images, prompts * 8).mean().item()

    base, tuned = score(tiny_flow_dir), score(final)
    print(f"{method}: brightness {base:.3f} -> {tuned:.3f}")
    assert tuned > base + 0.05, (base, tuned)
