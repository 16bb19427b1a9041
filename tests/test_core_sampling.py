"""Sampling on a Gaussian data distribution whose exact denoiser is known in closed form,
parity with diffusers' schedulers, and the sampling API."""

import pytest
import torch

from diffalign.core import FlowSchedule, VPSchedule, from_x0_eps, sample
from diffalign.core.steps import ddim_step, flow_ode_step


class GaussianDenoiser:
    """Exact denoiser for data ``x0 ~ N(mu, diag(s^2))``: ``x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2)``,
    ``E[x0 | x_t] = mu + alpha s^2 / V (x_t - alpha mu)``, ``E[eps | x_t] = sigma / V (x_t - alpha mu)``."""

    def __init__(self, mu, s, schedule, prediction_type):
        self.mu, self.s = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64)
        self.schedule, self.prediction_type = schedule, prediction_type
        self.calls = 0

    def encode_prompts(self, prompts):
        return torch.zeros(len(prompts), 1)

    def __call__(self, x_t, t, cond):
        self.calls += 1
        alpha, sigma = self.schedule.alpha_sigma(t.double())
        alpha, sigma = alpha.view(-1, 1), sigma.view(-1, 1)
        V = alpha**2 * self.s**2 + sigma**2
        r = x_t.double() - alpha * self.mu
        x0 = self.mu + alpha * self.s**2 / V * r
        eps = sigma / V * r
        return from_x0_eps(x0, eps, alpha, sigma, self.prediction_type).to(x_t.dtype)


MU, S = [1.5, -0.5], [0.5, 1.3]
# (sampler, eta, schedule, prediction type, steps)
CASES = [
    ("flow_ode", None, FlowSchedule(), "flow", 100),
    ("flow_ode", None, FlowSchedule(shift=3.0), "flow", 100),
    ("ddim", 0.0, VPSchedule(), "epsilon", 100),
    ("ddim", 0.0, VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), "v_prediction", 100),
    # ancestral DDPM drops the posterior variance of x0 at every step: it converges slowly in the step count
    ("ddim", 1.0, VPSchedule(), "epsilon", 1000),
    ("flow_sde", 0.7, FlowSchedule(), "flow", 100),
    ("dance_sde", 0.3, FlowSchedule(), "flow", 100),
    ("ddim", 0.0, FlowSchedule(), "flow", 100),
]


def _start_noise(schedule, n, g):
    """Exact x_1 marginal (VP schedules keep a little signal at t = 1: alpha(1) > 0)."""
    alpha, sigma = schedule.alpha_sigma(torch.tensor(1.0, dtype=torch.float64))
    mu, s = torch.tensor(MU, dtype=torch.float64), torch.tensor(S, dtype=torch.float64)
    return alpha * mu + torch.sqrt(alpha**2 * s**2 + sigma**2) * torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("sampler,eta,schedule,pred,steps", CASES)
def test_samplers_transport_noise_to_the_data_distribution(sampler, eta, schedule, pred, steps):
    model = GaussianDenoiser(MU, S, schedule, pred)
    g = torch.Generator().manual_seed(0)
    traj = sample(model, model.encode_prompts([""] * 20000), sampler=sampler, num_steps=steps, eta=eta,
                  noise=_start_noise(schedule, 20000, g), generator=g)
    x = traj.x0
    assert torch.allclose(x.mean(0), torch.tensor(MU, dtype=torch.float64), atol=0.04), x.mean(0)
    assert torch.allclose(x.std(0), torch.tensor(S, dtype=torch.float64), rtol=0.05), x.std(0)


def test_cps_terminal_distribution():
    """CPS re-noises from the predicted x0 at every step and keeps the noise coefficient at
    exactly t'. Its terminal mean is exact; its terminal variance is exact only where the
    posterior p(x0 | x_t) is a point mass (asserted below with point-mass data). With a broad
    posterior the posterior-mean denoiser loses variance at every re-noising, so CPS ends
    narrower than the data (measured with S = [0.5, 1.3], 10 steps, eta 0.7: std [0.37, 0.99]);
    this is a property of the method, documented in docs/architecture.md."""
    g = torch.Generator().manual_seed(0)
    point = GaussianDenoiser(MU, [0.0, 0.0], FlowSchedule(), "flow")
    x = sample(point, None, sampler="cps", num_steps=10, eta=0.7, generator=g,
               noise=torch.randn(20000, 2, generator=g, dtype=torch.float64)).x0
    assert torch.allclose(x, torch.tensor(MU, dtype=torch.float64).expand_as(x), atol=1e-9)
    wide = GaussianDenoiser(MU, S, FlowSchedule(), "flow")
    x = sample(wide, None, sampler="cps", num_steps=10, eta=0.7, generator=g,
               noise=torch.randn(20000, 2, generator=g, dtype=torch.float64)).x0
    assert torch.allclose(x.mean(0), torch.tensor(MU, dtype=torch.float64), atol=0.04)
    assert torch.all(x.std(0) < torch.tensor(S, dtype=torch.float64))


def test_wrong_sampler_endpoint_fails_the_check():
    """The analytic check can fail: a sampler with a deliberately wrong velocity scale misses."""

    class Scaled(GaussianDenoiser):
        def __call__(self, x_t, t, cond):
            return 1.2 * super().__call__(x_t, t, cond)

    model = Scaled(MU, S, FlowSchedule(), "flow")
    noise = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample(model, None, sampler="flow_ode", num_steps=100, noise=noise).x0
    assert not torch.allclose(x.std(0), torch.tensor(S, dtype=torch.float64), rtol=0.05)


# ----- parity with diffusers ----------------------------------------------------------------


def test_ddim_matches_diffusers_ddim_scheduler():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, timestep_spacing="trailing", set_alpha_to_one=True,
                                  clip_sample=False, prediction_type="epsilon")
    ours = VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref.set_timesteps(10)
    ts = ours.timesteps(10)
    assert torch.allclose(ours.t_to_timestep(ts[:-1]).round().long(), ref.timesteps.long())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    x_ref = x.clone()
    for i, k in enumerate(ref.timesteps):
        eps = torch.tanh(x) * 0.5 + 0.1 * float(k) / 1000  # any deterministic function of x
        eps_ref = torch.tanh(x_ref) * 0.5 + 0.1 * float(k) / 1000
        x = ddim_step(x, eps, ts[i], ts[i + 1], eta=0.0, schedule=ours).prev_sample
        x_ref = ref.step(eps_ref, k, x_ref, eta=0.0).prev_sample
        assert torch.allclose(x, x_ref, atol=1e-5), (i, (x - x_ref).abs().max())


def test_ddpm_eta_one_matches_diffusers_with_shared_noise():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", set_alpha_to_one=True,
                                  clip_sample=False)
    ours = VPSchedule()
    ref.set_timesteps(8)
    ts = ours.timesteps(8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    x_ref = x.clone()
    for i, k in enumerate(ref.timesteps):
        z = torch.randn(x.shape, generator=g)
        x = ddim_step(x, 0.3 * x, ts[i], ts[i + 1], eta=1.0, schedule=ours, noise=z).prev_sample
        x_ref = ref.step(0.3 * x_ref, k, x_ref, eta=1.0, variance_noise=z).prev_sample
        assert torch.allclose(x, x_ref, atol=1e-5), (i, (x - x_ref).abs().max())


def test_flow_ode_matches_diffusers_flow_match_euler():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(10)
    # diffusers stores its sigma_min already shifted and shifts the grid again: pass that value
    ours = FlowSchedule(shift=3.0, sigma_min=ref.sigma_min)
    assert torch.allclose(ours.timesteps(10).float(), ref.sigmas.float(), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    x_ref = x.clone()
    ts = ref.sigmas.double()
    for i, k in enumerate(ref.timesteps):
        x = flow_ode_step(x, torch.sin(x), ts[i], ts[i + 1]).prev_sample
        x_ref = ref.step(torch.sin(x_ref), k, x_ref).prev_sample
        assert torch.allclose(x, x_ref, atol=1e-5), (i, (x - x_ref).abs().max())


# ----- the sampling API -----------------------------------------------------------------------


def _flow_model():
    return GaussianDenoiser(MU, S, FlowSchedule(), "flow")


def test_trajectory_shapes_and_recomputed_log_probs():
    from diffalign.core.steps import flow_sde_step

    model = _flow_model()
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    traj = sample(model, None, sampler="flow_sde", num_steps=6, noise=noise, return_trajectory=True,
                  generator=torch.Generator().manual_seed(1))
    assert traj.latents.shape == (8, 7, 2) and traj.log_probs.shape == (8, 6) and traj.t.shape == (7,)
    assert torch.equal(traj.latents[:, 0], noise) and torch.equal(traj.latents[:, -1], traj.x0)
    for i in range(6):
        x = traj.latents[:, i]
        out = model(x, traj.t[i].expand(8), None)
        lp = flow_sde_step(x, out, traj.t[i], traj.t[i + 1], eta=0.7, prev_sample=traj.latents[:, i + 1]).log_prob
        assert torch.allclose(lp, traj.log_probs[:, i], atol=1e-5)


def test_sde_steps_window_makes_other_steps_deterministic():
    model = _flow_model()
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    runs = [sample(model, None, sampler="flow_sde", num_steps=6, noise=noise, sde_steps=[2, 3],
                   generator=torch.Generator().manual_seed(s), return_trajectory=True) for s in (1, 2)]
    assert torch.equal(runs[0].latents[:, :3], runs[1].latents[:, :3])  # before the window: ODE
    assert not torch.equal(runs[0].latents[:, 4], runs[1].latents[:, 4])  # inside: stochastic
    assert runs[0].sde_mask.tolist() == [False, False, True, True, False, False]
    assert torch.all(runs[0].log_probs[:, [0, 1, 4, 5]] == 0) and torch.all(runs[0].log_probs[:, 2:4] != 0)


def test_guidance_calls_the_model_once_per_step_with_both_branches():
    class Cond(GaussianDenoiser):
        def __call__(self, x_t, t, cond):
            return super().__call__(x_t, t, cond) + cond

    model = Cond(MU, S, FlowSchedule(), "flow")
    noise = torch.randn(3, 2, dtype=torch.float64)
    c, u = torch.ones(3, 1, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64)
    a = sample(model, c, num_steps=4, noise=noise, uncond=u, guidance_scale=2.0).x0
    assert model.calls == 4
    b = sample(model, 2 * c, num_steps=4, noise=noise).x0  # u + 2 (c - u) with the offset linear in cond
    assert torch.allclose(a, b)
    with pytest.raises(ValueError, match="needs an unconditional"):
        sample(model, c, num_steps=4, noise=noise, guidance_scale=2.0)


def test_grad_is_off_by_default_and_selectable_per_step():
    class Param(torch.nn.Module):
        prediction_type, schedule = "flow", FlowSchedule()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, t, cond):
            return self.w * x

    model = Param()
    noise = torch.randn(4, 2)
    assert not sample(model, None, num_steps=3, noise=noise).x0.requires_grad
    x = sample(model, None, num_steps=3, noise=noise, grad=[2]).x0
    x.sum().backward()
    g_last = model.w.grad.clone()
    model.w.grad = None
    sample(model, None, num_steps=3, noise=noise, grad=True).x0.sum().backward()
    assert g_last != 0 and not torch.allclose(g_last, model.w.grad)
    model.w.grad = None
    sample(model, None, num_steps=3, noise=noise, grad=True, checkpoint=True).x0.sum().backward()
    g_ckpt = model.w.grad.clone()
    model.w.grad = None
    sample(model, None, num_steps=3, noise=noise, grad=True).x0.sum().backward()
    assert torch.allclose(g_ckpt, model.w.grad)


def test_sampling_bad_input():
    model = _flow_model()
    noise = torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        sample(model, None, sampler="heun", noise=noise)
    with pytest.raises(ValueError, match="sde_steps must be indices"):
        sample(model, None, sampler="flow_sde", num_steps=3, sde_steps=[5], noise=noise)
    with pytest.raises(ValueError, match="needs a flow schedule"):
        sample(GaussianDenoiser(MU, S, VPSchedule(), "epsilon"), None, sampler="flow_sde", noise=noise)
