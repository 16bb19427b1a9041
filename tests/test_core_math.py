"""Tier-1 tests of the core math: closed forms, invariants and bad input."""

import math

import pytest
import torch

from diffalign.core import (
    FlowSchedule,
    VPSchedule,
    cfg,
    convert,
    from_x0_eps,
    gaussian_log_prob,
    get_step,
    shift_time,
    to_x0_eps,
)
from diffalign.core.steps import cps_step, dance_sde_step, ddim_step, flow_ode_step, flow_sde_step



# ----- schedules ----------------------------------------------------------------------------


def test_flow_schedule_grid_and_shift():
    s = FlowSchedule(shift=3.0)
    ts = s.timesteps(4)
    base = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    assert torch.allclose(ts, 3 * base / (1 + 2 * base))
    assert ts[0] == 1 and ts[-1] == 0
    assert torch.all(ts[:-1] > ts[1:])
    alpha, sigma = s.alpha_sigma(torch.tensor(0.3))
    assert alpha.item() == pytest.approx(0.7) and sigma.item() == pytest.approx(0.3)
    # shift > 1 spends more of the grid at high noise
    assert torch.all(shift_time(base[1:-1], 3.0) > base[1:-1])


def test_flow_schedule_sigma_min_grid_matches_diffusers_layout():
    ts = FlowSchedule(shift=1.0, sigma_min=0.001).timesteps(5)
    assert ts.shape == (6,) and ts[-1] == 0 and ts[-2] == pytest.approx(0.001)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_schedule_exact_on_grid_and_monotone(beta_schedule):
    s = VPSchedule(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012)
    abar = s.alphas_cumprod
    k = torch.tensor([0, 1, 499, 999])
    alpha, sigma = s.alpha_sigma(s.timestep_to_t(k))
    assert torch.allclose(alpha**2, abar[k], rtol=1e-10)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(4, dtype=torch.float64))
    a0, s0 = s.alpha_sigma(torch.tensor(0.0))
    assert a0.item() == 1.0 and s0.item() == 0.0
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    a, _ = s.alpha_sigma(t)
    assert torch.all(a[1:] <= a[:-1])


def test_vp_schedule_matches_diffusers_betas():
    diffusers = pytest.importorskip("diffusers")
    for kind in ["linear", "scaled_linear", "squaredcos_cap_v2"]:
        ref = diffusers.DDPMScheduler(beta_schedule=kind, beta_start=0.00085, beta_end=0.012)
        ours = VPSchedule(beta_schedule=kind, beta_start=0.00085, beta_end=0.012)
        assert torch.allclose(ours.alphas_cumprod.float(), ref.alphas_cumprod.float(), rtol=1e-5, atol=1e-7), kind


def test_schedules_are_frozen_and_validated():
    s = FlowSchedule()
    with pytest.raises(Exception):
        s.shift = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="shift must be > 0, got -1"):
        FlowSchedule(shift=-1)
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        VPSchedule(beta_schedule="quadratic")
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\], got 1.5"):
        s.alpha_sigma(torch.tensor(1.5))
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        s.timesteps(0)


# ----- parametrisation ----------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [FlowSchedule(), VPSchedule()])
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction", "flow"])
def test_prediction_round_trip(schedule, pred):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    out = from_x0_eps(x0, eps, alpha, sigma, pred)
    x0_hat, eps_hat = to_x0_eps(out, x_t, alpha, sigma, pred)
    assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9)
    for target in ["epsilon", "sample", "v_prediction", "flow"]:
        assert torch.allclose(convert(out, x_t, alpha, sigma, pred, target), from_x0_eps(x0, eps, alpha, sigma, target), atol=1e-9)


def test_flow_velocity_is_eps_minus_x0():
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    t = torch.tensor(0.3)
    assert torch.allclose(from_x0_eps(x0, eps, 1 - t, t, "flow"), eps - x0)


def test_cfg_formula_and_identity():
    # u + w (c - u) in float32 loses ~1 ulp of |u| to cancellation: compare to within a few ulps
    c, u = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(cfg(c, u, 1.0), c, rtol=0, atol=1e-6)
    assert torch.allclose(cfg(c, u, 0.0), u, rtol=0, atol=1e-6)
    assert torch.allclose(cfg(c, u, 3.0), u + 3 * (c - u), rtol=0, atol=1e-6)


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        to_x0_eps(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.5, "score")


# ----- steps: log-probs and invariants --------------------------------------------------------

STOCHASTIC = [("ddim", 1.0, VPSchedule(), "epsilon"), ("flow_sde", 0.7, FlowSchedule(), "flow"),
              ("dance_sde", 0.3, FlowSchedule(), "flow"), ("cps", 0.7, FlowSchedule(), "flow")]


@pytest.mark.parametrize("sampler,eta,schedule,pred", STOCHASTIC)
def test_log_prob_is_gaussian_density_and_rescoring_matches(sampler, eta, schedule, pred):
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    step = get_step(sampler)
    o = step(x, out, 0.6, 0.5, eta=eta, generator=g, schedule=schedule, prediction_type=pred)
    ref = torch.distributions.Normal(o.mean, o.std.expand_as(o.mean)).log_prob(o.prev_sample).mean(dim=(1, 2, 3))
    assert torch.allclose(o.log_prob, ref.float(), atol=1e-5)
    again = step(x, out, 0.6, 0.5, eta=eta, prev_sample=o.prev_sample, schedule=schedule, prediction_type=pred)
    assert torch.allclose(again.log_prob, o.log_prob) and torch.equal(again.prev_sample, o.prev_sample)
    # the scored log-prob carries a gradient to the model output (PPO needs it)
    out_r = out.clone().requires_grad_(True)
    lp = step(x, out_r, 0.6, 0.5, eta=eta, prev_sample=o.prev_sample, schedule=schedule, prediction_type=pred).log_prob
    lp.sum().backward()
    assert out_r.grad is not None and out_r.grad.abs().sum() > 0


def test_given_noise_is_used():
    x, v, z = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    o = flow_sde_step(x, v, 0.5, 0.4, eta=0.7, noise=z)
    assert torch.allclose(o.prev_sample, o.mean + o.std * z)


def test_ddim_eta_zero_is_deterministic_and_has_zero_log_prob():
    s = VPSchedule()
    x, e = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a = ddim_step(x, e, 0.8, 0.6, eta=0.0, schedule=s, generator=torch.Generator().manual_seed(0))
    b = ddim_step(x, e, 0.8, 0.6, eta=0.0, schedule=s, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.prev_sample, b.prev_sample)
    assert torch.all(a.log_prob == 0)


def test_ddim_on_flow_schedule_equals_euler():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    d = ddim_step(x, v, 0.7, 0.4, eta=0.0, schedule=FlowSchedule(), prediction_type="flow")
    e = flow_ode_step(x, v, 0.7, 0.4)
    assert torch.allclose(d.prev_sample, e.prev_sample, atol=1e-12)


def test_cps_eta_zero_is_euler_and_keeps_noise_coefficient():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(cps_step(x, v, 0.7, 0.4, eta=0.0).prev_sample, flow_ode_step(x, v, 0.7, 0.4).prev_sample)
    # with exact x0 / eps the CPS sample is (1 - t') x0 + t' * (unit-variance noise): coefficients preserved
    x0, eps = torch.randn(20000), torch.randn(20000)
    t, tp = 0.7, 0.4
    o = cps_step((1 - t) * x0 + t * eps, eps - x0, t, tp, eta=0.8, generator=torch.Generator().manual_seed(0))
    resid = o.prev_sample - (1 - tp) * x0
    assert resid.std().item() == pytest.approx(tp, rel=0.03)


def test_flow_sde_t_equal_one_edge_is_finite():
    x, v = torch.randn(4, 3), torch.randn(4, 3)
    o = flow_sde_step(x, v, 1.0, 0.9, eta=0.7)
    assert torch.isfinite(o.prev_sample).all() and torch.isfinite(o.log_prob).all()
    # noise level evaluated at t_prev: std = a sqrt(t'/(1-t')) sqrt(dt)
    assert o.std.item() == pytest.approx(0.7 * math.sqrt(0.9 / 0.1) * math.sqrt(0.1))


def test_gaussian_log_prob_zero_std_is_zero():
    x = torch.randn(2, 3)
    assert torch.all(gaussian_log_prob(x, x, torch.zeros(())) == 0)


# ----- bad input ------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"unknown sampler 'euler_a'; choose one of \['cps', 'dance_sde', 'ddim'"):
        get_step("euler_a")
    with pytest.raises(ValueError, match=r"eta for ddim must be in \[0.0, 1.0\], got 1.3"):
        ddim_step(x, v, 0.5, 0.4, eta=1.3, schedule=VPSchedule())
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\], got 1.2"):
        flow_sde_step(x, v, 1.2, 0.4)
    with pytest.raises(ValueError, match="t_prev must be < t"):
        flow_ode_step(x, v, 0.4, 0.4)
    with pytest.raises(ValueError, match=r"model_output shape \(2, 4\) != x_t shape \(2, 3\)"):
        flow_ode_step(x, torch.randn(2, 4), 0.5, 0.4)
    with pytest.raises(ValueError, match="prev_sample shape"):
        dance_sde_step(x, v, 0.5, 0.4, prev_sample=torch.randn(3, 3))
    with pytest.raises(ValueError, match="needs a flow schedule"):
        flow_sde_step(x, v, 0.5, 0.4, schedule=VPSchedule())
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[B=2\]"):
        flow_ode_step(x, v, torch.tensor([0.5, 0.5, 0.5]), 0.4)


def test_ddim_clip_sample_clamps_x0_and_keeps_log_probs_consistent():
    s = VPSchedule(beta_schedule="squaredcos_cap_v2")
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    wild = ddim_step(x, eps, 1.0, 0.9, eta=0.0, schedule=s)
    tame = ddim_step(x, eps, 1.0, 0.9, eta=0.0, schedule=s, clip_sample=1.0)
    # with alpha(1) ~ 5e-5 the unclipped x0 explodes; clipped, x' = alpha' x0 + sigma' eps stays bounded
    assert wild.prev_sample.abs().max() > 100
    assert tame.prev_sample.abs().max() < 10
    o = ddim_step(x, eps, 0.6, 0.5, eta=1.0, schedule=s, clip_sample=1.0, generator=torch.Generator().manual_seed(0))
    again = ddim_step(x, eps, 0.6, 0.5, eta=1.0, schedule=s, clip_sample=1.0, prev_sample=o.prev_sample)
    assert torch.allclose(o.log_prob, again.log_prob)
