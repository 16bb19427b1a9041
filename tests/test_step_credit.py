"""Step-level credit (docs/algorithms/step_credit.md): per-step advantages in the policy-gradient core,
branching rollouts, intermediate rewards, and DenseGRPO, TP-GRPO, G2RPO, B2-DiffuRL, PRDP and VARD."""

import math

import pytest
import torch

from diffalign import algorithms
from diffalign.algorithms._rollout import Batch, rollout
from diffalign.algorithms._step_credit import (
    branch_rollout,
    completion_grid,
    latent_rewards,
    step_group_advantages,
)
from diffalign.algorithms.b2_diffurl import extreme_advantages
from diffalign.algorithms.dense_grpo import calibrate_eta, reward_gains
from diffalign.algorithms.g2rpo import integrated_advantages
from diffalign.algorithms.prdp import rdp_loss
from diffalign.algorithms.tp_grpo import turning_point_rewards
from diffalign.runtime.lora import Reference
from test_online_rl import PROMPTS, tiny_model, verifier_reward

METHODS = ["dense_grpo", "dense_grpo_tweedie", "tp_grpo", "g2rpo", "b2_diffurl", "prdp", "vard"]
SMALL = {"dense_grpo": {}, "dense_grpo_tweedie": {}, "tp_grpo": {"window_size": 3},
         "g2rpo": {"branch_window": [0, 2], "granularities": [1, 2]}, "b2_diffurl": {"initial_interval": 2},
         "prdp": {}, "vard": {"value_warmup_epochs": 0, "value_steps": 3}}


def build(method, model=None, **overrides):
    cfg = algorithms.build_config(method, {"group_size": 4, "batch_size": 8, "num_steps": 4, "micro_batch_size": 4,
                                           **SMALL[method], **overrides})
    ref = Reference(model) if cfg.beta > 0 and model is not None else None
    return algorithms.get(method)[1](cfg, reward=verifier_reward, reference=ref)


def fake_batch(n, T, group_size, **fields):
    group = torch.arange(n // group_size).repeat_interleave(group_size)
    base = dict(prompts=["p"] * n, group=group, cond=None, uncond=None, latents=None, log_probs=None,
                t=torch.linspace(1, 0, T + 1), sde_mask=torch.ones(T, dtype=torch.bool), rewards=torch.zeros(n),
                advantages=None, valid=torch.ones(n, dtype=torch.bool), images=None)
    return Batch(**{**base, **fields})


# ----- per-step advantages in the policy-gradient core -------------------------------------------------

def test_per_step_advantages_reach_the_ppo_loss_step_by_step():
    """Only step 2 carries advantage: every other step's micro-batch has exactly zero policy gradient,
    step 2's does not, and it equals the gradient of a [N] advantage restricted to that step."""
    model = tiny_model()
    algo = build("dense_grpo", beta=0.0, micro_batch_size=8)  # one step per micro-batch
    batch = algo.collect(model, PROMPTS, epoch=0, seed=3)
    adv = torch.zeros(8, 4)
    adv[:, 2] = torch.linspace(-1, 1, 8)
    batch.advantages = adv
    model.train()
    params = [p for p in model.unet.parameters()]
    grads = {}
    for micro in next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0)))):
        model.zero_grad()
        loss, _ = algo.loss(model, micro)
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
        assert len(micro.steps.unique()) == 1
        grads.setdefault(int(micro.steps[0]), []).append(g.abs().max().item())
    assert set(grads) == {0, 1, 2, 3}
    assert all(v == 0 for j in (0, 1, 3) for v in grads[j]) and all(v > 0 for v in grads[2])
    # the same per-sample advantage as a [N] tensor gives step 2 the same gradient
    micro = [m for m in next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0)))) if m.steps[0] == 2][0]
    model.zero_grad()
    algo.loss(model, micro)[0].backward()
    g_step = [p.grad.clone() for p in params]
    batch.advantages = adv[:, 2].clone()
    model.zero_grad()
    algo.loss(model, micro)[0].backward()
    for a, b in zip(g_step, (p.grad for p in params)):
        torch.testing.assert_close(a, b)


def test_step_group_advantages_normalise_each_step_within_its_group():
    v = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, float("nan")], [5.0, 2.0]])
    a = step_group_advantages(v, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(a[:2, 0], torch.tensor([-1.0, 1.0]) * 1 / (1 + 1e-4))
    assert a[2, 0] == 0 and a[3, 0] == 0  # equal rewards carry no signal
    assert torch.all(a[:2, 1] == 0)
    assert a[2, 1] == 0 and a[3, 1] == 0  # a failed entry (NaN) and a group of one valid entry


# ----- DenseGRPO ---------------------------------------------------------------------------------------

def test_dense_grpo_advantages_on_a_hand_made_trajectory():
    """Two groups of two trajectories, T = 3, with known rewards R_j of the clean images of their latents:
    the dense reward of step j is R_{j+1} - R_j, normalised within the group at that step."""
    R = torch.tensor([[0.2, 0.4, 0.4, 1.0],
                      [0.2, 0.1, 0.3, 0.0],
                      [0.5, 0.5, 0.9, 0.9],
                      [0.5, 0.6, 0.6, 0.8]])
    gains = reward_gains(R)
    torch.testing.assert_close(gains, torch.tensor([[0.2, 0.0, 0.6], [-0.1, 0.2, -0.3],
                                                    [0.0, 0.4, 0.0], [0.1, 0.0, 0.2]]))
    algo = build("dense_grpo", num_steps=3, calibrate_noise=False)
    A = algo.advantages(fake_batch(4, 3, 2, step_rewards=R))
    # in a pair the std is half the difference h: the advantages are +-h / (h + eps), GRPO's eps = 1e-4
    h = torch.tensor([[0.15, 0.1, 0.45], [0.05, 0.2, 0.1]]).repeat_interleave(2, dim=0)
    sign = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]])
    torch.testing.assert_close(A, sign * h / (h + 1e-4))
    # final-reward GRPO would give trajectory 0 the same +1 at every step, including step 1 where it gained nothing
    assert A[0, 1] < 0


def test_ode_completion_of_an_ode_trajectory_reaches_its_own_end():
    """R_j by ODE completion: along a deterministic trajectory every latent leads to the same image, so
    R_j = R_T for every j; the Tweedie estimate of the last latent is close to it as well."""
    model = tiny_model()
    batch = rollout(model, PROMPTS, verifier_reward, group_size=2, sampler="flow_sde", num_steps=4, eta=0.0,
                    guidance_scale=1.0, sde_steps=[], seed=1)
    R, scored = latent_rewards(model, batch, verifier_reward, mode="ode", sampler="flow_sde", guidance_scale=1.0)
    assert scored == 4 * 4 and R.shape == (4, 5)
    torch.testing.assert_close(R, R[:, -1:].expand(4, 5), atol=1e-5, rtol=0)
    R1, _ = latent_rewards(model, batch, verifier_reward, mode="ode", sampler="flow_sde", guidance_scale=1.0,
                           steps=[1], stride=2)
    assert torch.isnan(R1[:, [0, 2, 3]]).all() and torch.isfinite(R1[:, 1]).all()
    assert completion_grid(batch.t, 1, 2).tolist() == [batch.t[1].item(), batch.t[3].item(), 0.0]


def test_dense_grpo_noise_calibration():
    gains = torch.tensor([[-1.0, 1.0, 1.0, 0.0], [-1.0, -1.0, 1.0, 0.0], [-1.0, 1.0, 1.0, 0.0], [1.0, -1.0, 1.0, 0.0]])
    etas = calibrate_eta([0.7] * 4, gains, [0, 1, 2, 3], rate=0.1, tolerance=0.1, lo=0.1, hi=0.75)
    # step 0: 1/4 positive (exploration destroys reward) -> lower; step 1: balanced -> raise (to the cap);
    # step 2: all positive -> kept; step 3: no nonzero gain -> kept
    assert etas == pytest.approx([0.63, 0.75, 0.7, 0.7])


def test_dense_grpo_samples_with_its_calibrated_levels_and_resumes_them():
    model = tiny_model()
    algo = build("dense_grpo", calibration_rate=0.2)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=3)
    calibrated = list(algo.etas)
    assert batch.eta.tolist() == pytest.approx([0.7] * 4) and calibrated != [0.7] * 4
    nxt = algo.collect(model, PROMPTS, epoch=1, seed=4)
    assert nxt.eta.tolist() == pytest.approx(calibrated)  # epoch 1 samples with epoch 0's calibration
    fresh = build("dense_grpo", calibration_rate=0.2)
    fresh.load_state_dict(algo.state_dict())
    assert fresh.etas == algo.etas
    # the stored log-probs are those of the per-step levels: the ratio is 1 on the first pass
    for micro in next(iter(algo.minibatches(nxt, torch.Generator().manual_seed(0)))):
        assert algo.loss(model, micro)[1]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)


# ----- TP-GRPO -----------------------------------------------------------------------------------------

def test_tp_grpo_turning_points_on_a_hand_made_trajectory():
    # d = [-0.1, +0.3, +0.1, -0.05]: the trend is up (R_T - R_0 = +0.25); step 1 flips down -> up, goes with
    # the trend and what follows (R_T - R_2 = +0.05) keeps it: a turning point with reward R_T - R_1 = 0.35
    R = torch.tensor([[0.5, 0.4, 0.7, 0.8, 0.75]])
    rewards, turning = turning_point_rewards(R)
    assert turning.tolist() == [[False, True, False, False]]
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 0.35, 0.1, -0.05]]))
    # the first step counts as a flip: it is a turning point when it goes with the trend and what follows keeps it
    R = torch.tensor([[0.2, 0.5, 0.4, 0.6]])
    rewards, turning = turning_point_rewards(R)
    assert turning.tolist() == [[True, False, True]]
    torch.testing.assert_close(rewards, torch.tensor([[0.4, -0.1, 0.2]]))


# ----- G2RPO -------------------------------------------------------------------------------------------

def test_g2rpo_attributes_each_reward_to_its_single_stochastic_step():
    model = tiny_model()
    algo = build("g2rpo", branch_window=[1, 2], branches_per_epoch=2)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=3)
    assert batch.sde_mask.tolist() == [False, True, True, False]
    for g in range(2):  # one deterministic anchor per group: every member starts step k from the same x_{t_k}
        rows = batch.latents[batch.group == g]
        assert torch.equal(rows, rows[:1].expand_as(rows))
    for k in (1, 2):  # the single SDE step is where the members part
        x = batch.next_latents[:4, k]
        assert (x[0] - x[1]).abs().max() > 1e-3
    assert batch.advantages.shape == (8, 4) and torch.all(batch.advantages[:, [0, 3]] == 0)
    # without noise in that step there is nothing to attribute: identical images, zero advantages
    still = build("g2rpo", branch_window=[1, 2], branches_per_epoch=2, eta=0.0)
    quiet = still.collect(model, PROMPTS, epoch=0, seed=3)
    assert torch.all(quiet.advantages == 0)


def test_g2rpo_integrates_advantages_over_granularities():
    nan = float("nan")
    R = torch.tensor([[[nan, nan], [1.0, 0.0]], [[nan, nan], [3.0, 0.0]],
                      [[nan, nan], [0.0, 2.0]], [[nan, nan], [0.0, 6.0]]])  # [N=4, T=2, granularities=2]
    A = integrated_advantages(R, torch.tensor([0, 0, 0, 0]))
    # step 1, granularity 1: rewards 1, 3, 0, 0 -> mean 1, std sqrt(1.5);
    # granularity 2: 0, 0, 2, 6 -> mean 2, std sqrt(6)
    g1 = (torch.tensor([1.0, 3.0, 0.0, 0.0]) - 1) / (math.sqrt(1.5) + 1e-4)
    g2 = (torch.tensor([0.0, 0.0, 2.0, 6.0]) - 2) / (math.sqrt(6) + 1e-4)
    torch.testing.assert_close(A[:, 1], g1 + g2)
    assert torch.all(A[:, 0] == 0)


# ----- B2-DiffuRL ---------------------------------------------------------------------------------------

def test_b2_diffurl_interval_grows_backwards_and_branches_share_a_trunk():
    cfg = algorithms.build_config("b2_diffurl", {"num_steps": 10, "initial_interval": 3, "progressive_epochs": 8})
    assert [cfg.interval(e) for e in (0, 1, 2, 4, 6, 7, 100)] == [3, 4, 5, 7, 9, 10, 10]
    model = tiny_model()
    batch = branch_rollout(model, PROMPTS, verifier_reward, group_size=4, sampler="flow_sde", num_steps=4, eta=0.7,
                           guidance_scale=1.0, sde_steps=None, seed=5, branch_step=2)
    assert batch.sde_mask.tolist() == [False, False, True, True] and torch.all(batch.log_probs[:, :2] == 0)
    for g in range(2):
        rows = batch.latents[batch.group == g]
        assert torch.equal(rows[:, :3], rows[:1, :3].expand(4, 3, *rows.shape[2:]))  # the trunk, up to x_{t_2}
        assert (rows[0, 3] - rows[1, 3]).abs().max() > 1e-3  # the branches part after it
    adv = extreme_advantages(torch.tensor([1.2, -0.3, 0.4, -1.1, 0.2, 0.1, -0.2, 0.0]), torch.tensor([0] * 4 + [1] * 4),
                             0.5, -0.5)
    assert adv.tolist() == pytest.approx([1.2, 0, 0, -1.1, 0, 0, 0, 0])


def test_branch_step_zero_is_the_shared_noise_rollout():
    model = tiny_model()
    kw = dict(group_size=4, sampler="flow_sde", num_steps=3, eta=0.7, guidance_scale=1.0, sde_steps=None, seed=5)
    a = branch_rollout(model, PROMPTS, verifier_reward, branch_step=0, **kw)
    starts = a.latents[:, 0]
    assert torch.equal(starts[:4], starts[:1].expand(4, *starts.shape[1:]))
    b = rollout(model, PROMPTS, verifier_reward, shared_noise=True, **kw)
    assert torch.equal(a.latents[:, 0], b.latents[:, 0])


# ----- PRDP --------------------------------------------------------------------------------------------

def test_prdp_regression_target_and_loss_by_hand():
    rho = torch.tensor([0.001, -0.002, 0.0005, 0.004], requires_grad=True)  # log p_theta - log p_old at one step
    y = torch.tensor([1.0, -1.0, 0.5, -0.5])  # group-normalised rewards
    group = torch.tensor([0, 0, 1, 1])
    loss, stats = rdp_loss(rho, y, group, scale=100.0, clip=0.003)
    # pairs (0, 1) and (2, 3): target y_a - y_b = 2 and 1; prediction 100 (rho_a - clip(rho_b)) = 0.3 and -0.25
    e1, e2 = 2.0 - 100 * (0.001 + 0.002), 1.0 - 100 * (0.0005 - 0.003)
    assert loss.item() == pytest.approx((e1 ** 2 + e2 ** 2) / 2)
    assert stats["rdp_pairs"] == 2 and stats["clip_frac"] == 0.25
    loss.backward()
    assert rho.grad[3] == 0  # clipped: the proximal update stops there
    assert rho.grad[0] == pytest.approx(-100 * e1) and rho.grad[1] == pytest.approx(100 * e1)
    alone, _ = rdp_loss(rho[:1], y[:1], group[:1], scale=100.0, clip=0.003)
    assert alone.item() == 0 and alone.requires_grad  # no pair: an exact zero with a graph


def test_prdp_micro_batches_hold_whole_groups_and_the_loss_is_zero_at_the_target():
    model = tiny_model()
    algo = build("prdp", beta=0.0, group_size=2, micro_batch_size=4)
    batch = algo.collect(model, PROMPTS + ["three red squares", "a green circle"], epoch=0, seed=3)
    seen = set()
    for micro in next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0)))):
        groups = batch.group[micro.idx]
        assert all((groups == g).sum() == 2 for g in groups.unique())
        assert len(micro.steps.unique()) == 1  # a pair compares two samples at one step
        seen.update(zip(micro.idx.tolist(), micro.steps.tolist()))
    assert seen == {(i, j) for i in range(8) for j in range(4)}
    batch.advantages = torch.zeros(8)  # equal rewards and rho = 0 on the first pass: nothing to regress
    micro = next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0))))[0]
    assert algo.loss(model, micro)[0].item() == pytest.approx(0.0, abs=1e-6)


# ----- VARD --------------------------------------------------------------------------------------------

def test_vard_value_fit_and_policy_loss_through_the_value():
    model = tiny_model()
    algo = build("vard", model, value_steps=30, value_batch=32)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=3)
    target = algo.value_targets(batch)
    torch.testing.assert_close(target, batch.advantages)  # the reward normalised within its group
    before = ((algo.value(batch.latents[:, -1], torch.zeros(()), batch.prompts) - target) ** 2).mean()
    algo.fit_value(batch, seed=9)
    after = ((algo.value(batch.latents[:, -1], torch.zeros(()), batch.prompts) - target) ** 2).mean()
    assert after < 0.8 * before  # the value regresses onto the rollouts' (normalised) rewards
    assert not any(p.requires_grad for p in algo.value.parameters())

    class Linear(torch.nn.Module):  # a hand-made value V(x) = sum(w x): its gradient is w
        def __init__(self):
            super().__init__()
            self.w = torch.randn(3, 32, 32)

        def forward(self, x, t, prompts):
            return (x * self.w).flatten(1).sum(1)

    algo.value = Linear()
    micro = next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0))))[0]
    model.train()
    r = algo.rescore(model, micro)
    loss, stats = algo.loss(model, micro)
    x_prev = batch.latents[micro.idx, micro.steps + 1]
    want_v = (x_prev * algo.value.w).flatten(1).sum(1).mean()
    assert float(stats["value_pred"]) == pytest.approx(want_v.item(), rel=1e-5)
    assert float(stats["kl"]) == pytest.approx(0.0, abs=1e-10)  # the policy is the reference at initialisation
    # gradient: -value_weight * d/dtheta mean(w . mu_theta), the pathwise gradient through the step's mean
    model.zero_grad()
    loss.backward()
    g = [p.grad.clone() for p in model.unet.parameters()]
    model.zero_grad()
    (-(r.step.mean * algo.value.w).flatten(1).sum(1).mean()).backward()
    for a, b in zip(g, (p.grad for p in model.unet.parameters())):
        torch.testing.assert_close(a, b)


def test_vard_trains_only_the_value_during_warm_up():
    model = tiny_model()
    algo = build("vard", model, value_warmup_epochs=1)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=3)
    assert list(algo.minibatches(batch, torch.Generator().manual_seed(0))) == []
    batch = algo.collect(model, PROMPTS, epoch=1, seed=4)
    assert len(list(algo.minibatches(batch, torch.Generator().manual_seed(0)))) == 1


def test_vard_needs_a_reference():
    with pytest.raises(ValueError, match="needs a reference model"):
        build("vard")


# ----- every method: on-policy ratio, config validation ---------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_every_method_collects_and_recomputes_its_log_probs_on_policy(method):
    model = tiny_model()
    algo = build(method, model)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=3)
    assert batch.advantages.shape in ((8,), (8, 4)) and batch.advantages.abs().max() > 0
    n = 0
    for micro in next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0)))):
        r = algo.rescore(model, micro)
        torch.testing.assert_close(r.step.log_prob, batch.log_probs[micro.idx, micro.steps], atol=1e-5, rtol=0)
        n += 1
    assert n > 0


@pytest.mark.parametrize("method,overrides,message", [
    ("dense_grpo", {"intermediate_reward": "reward_model"},
     "intermediate_reward must be one of ['ode', 'tweedie'], got 'reward_model'"),
    ("dense_grpo", {"completion_stride": 0}, "completion_stride must be an integer in [1, 4], got 0"),
    ("dense_grpo", {"calibration_rate": 1.0}, "calibration_rate must be in [0, 1), got 1.0"),
    ("dense_grpo", {"calibration_tolerance": 0.7}, "calibration_tolerance must be in [0, 0.5], got 0.7"),
    ("dense_grpo", {"eta_min": 0.0}, "eta_min must be in (0, inf), got 0.0"),
    ("dense_grpo", {"eta_max": 0.05}, "eta_max must be in [0.1, 2], got 0.05"),
    ("dense_grpo", {"eta": 1.8}, "eta must be in [0.1, 1.5], got 1.8"),
    ("tp_grpo", {"intermediate_reward": "clip"}, "intermediate_reward must be one of ['ode', 'tweedie'], got 'clip'"),
    ("g2rpo", {"branch_window": [3, 1]}, "branch_window must be [first, last] step indices with 0 <= first <= last "
                                         "< num_steps=4, got [3, 1]"),
    ("g2rpo", {"branches_per_epoch": 5}, "branches_per_epoch must be an integer in [1, 3], got 5"),
    ("g2rpo", {"granularities": [1, 1]}, "granularities must be distinct integer strides in [1, num_steps=4], "
                                         "got [1, 1]"),
    ("g2rpo", {"granularities": []}, "granularities must be distinct integer strides"),
    ("g2rpo", {"window_size": 2}, "window_size=2 does not apply to g2rpo"),
    ("b2_diffurl", {"initial_interval": 0}, "initial_interval must be an integer in [1, 4], got 0"),
    ("b2_diffurl", {"progressive_epochs": 0}, "progressive_epochs must be an integer in [1, inf), got 0"),
    ("b2_diffurl", {"pos_threshold": -1.0}, "pos_threshold must be in [0, inf), got -1.0"),
    ("b2_diffurl", {"neg_threshold": 0.5}, "neg_threshold must be in (-inf, 0], got 0.5"),
    ("prdp", {"prdp_beta": 0.0}, "prdp_beta must be in (0, inf), got 0.0"),
    ("prdp", {"micro_batch_size": 6}, "micro_batch_size=6 must be a multiple of group_size=4"),
    ("prdp", {"loss": "reinforce"}, "loss='reinforce' does not apply to prdp"),
    ("vard", {"beta": 0.0}, "beta must be in (0, inf), got 0.0"),
    ("vard", {"value_lr": -1.0}, "value_lr must be in (0, inf), got -1.0"),
    ("vard", {"value_steps": 0}, "value_steps must be an integer in (0, inf), got 0"),
    ("vard", {"value_warmup_epochs": -1}, "value_warmup_epochs must be an integer in [0, inf), got -1"),
    ("vard", {"loss": "reinforce"}, "loss='reinforce' does not apply to vard"),
    ("vard", {"value_target": "return"}, "value_target must be one of ['advantage', 'reward'], got 'return'"),
    ("vard", {"value_batch": 0}, "value_batch must be an integer in (0, inf), got 0"),
    ("vard", {"value_hidden": 2.5}, "value_hidden: expected int, got 2.5"),
    ("dense_grpo", {"calibrate_noise": "yes"}, "calibrate_noise: expected bool, got 'yes'"),
])
def test_bad_step_credit_config(method, overrides, message):
    with pytest.raises(ValueError) as e:
        algorithms.build_config(method, {"group_size": 4, "batch_size": 8, "num_steps": 4, "micro_batch_size": 4,
                                         **SMALL[method], **overrides})
    assert message in str(e.value)


@pytest.mark.parametrize("sampler", ["flow_sde", "dance_sde", "cps", "ddim"])
def test_a_noise_level_per_row_equals_each_row_on_its_own(sampler):
    """Steps take ``eta`` as a tensor ``[B]`` (rows of several steps whose calibrated levels differ)."""
    from diffalign.core.schedules import FlowSchedule
    from diffalign.core.steps import get_step

    g = torch.Generator().manual_seed(0)
    x, out, prev = (torch.randn(3, 3, 4, 4, generator=g) for _ in range(3))
    t, t_prev = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64), torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    eta = torch.tensor([0.2, 0.5, 0.9])
    step = get_step(sampler)
    kw = {"schedule": FlowSchedule(), "prediction_type": "flow"}
    rows = step(x, out, t, t_prev, eta=eta, prev_sample=prev, **kw)
    for i in range(3):
        one = step(x[i:i + 1], out[i:i + 1], t[i], t_prev[i], eta=float(eta[i]), prev_sample=prev[i:i + 1], **kw)
        torch.testing.assert_close(rows.mean[i:i + 1], one.mean)
        torch.testing.assert_close(rows.log_prob[i:i + 1], one.log_prob)
    with pytest.raises(ValueError, match=f"eta for {sampler} must be in"):
        step(x, out, t, t_prev, eta=torch.tensor([0.2, -0.5, 0.9]), prev_sample=prev, **kw)
