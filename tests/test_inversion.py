"""DDIM / ReNoise inversion (``core/inversion.py``): the exact inverse of a DDIM step for every
parametrisation, and reconstruction of images through inversion and deterministic sampling on the
shipped shapes models and a tiny random diffusers pipeline."""

import pytest
import torch

from diffalign.core.inversion import ddim_inversion, inversion_step
from diffalign.core.schedules import FlowSchedule, VPSchedule
from diffalign.core.steps import ddim_step
from diffalign.models import load_model
from diffalign.worlds import shapes

PROMPTS = ["two red circles", "a blue square left of a green triangle", "three yellow squares", "one purple triangle"]


@pytest.mark.parametrize("ptype,schedule", [("epsilon", VPSchedule("scaled_linear", 0.00085, 0.012)),
                                            ("v_prediction", VPSchedule()), ("sample", VPSchedule()),
                                            ("flow", FlowSchedule()), ("epsilon", FlowSchedule())])
def test_one_inversion_step_is_undone_by_one_ddim_step_with_the_same_prediction(ptype, schedule):
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t, t_next = torch.tensor([0.1, 0.3, 0.55], dtype=torch.float64), torch.tensor([0.2, 0.6, 0.9], dtype=torch.float64)
    up = inversion_step(x_t, out, t, t_next, schedule, ptype)
    down = ddim_step(up, out, t_next, t, eta=0.0, schedule=schedule, prediction_type=ptype).prev_sample
    torch.testing.assert_close(down, x_t, rtol=1e-4, atol=1e-4)


def test_flow_inversion_is_the_euler_step_and_epsilon_inversion_the_classic_formula():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t, tn = torch.tensor([0.2, 0.4], dtype=torch.float64), torch.tensor([0.5, 0.7], dtype=torch.float64)
    torch.testing.assert_close(inversion_step(x, v, t, tn, FlowSchedule(), "flow"),
                               x + (tn - t).float().view(-1, 1, 1, 1) * v)
    vp = VPSchedule()
    a, s = (q.float().view(-1, 1, 1, 1) for q in vp.alpha_sigma(t))
    an, sn = (q.float().view(-1, 1, 1, 1) for q in vp.alpha_sigma(tn))
    torch.testing.assert_close(inversion_step(x, v, t, tn, vp, "epsilon"), an * (x - s * v) / a + sn * v,
                               rtol=1e-5, atol=1e-5)


def _reconstruct(model, x0, cond, t_end, steps, renoise):
    grid = torch.linspace(0, t_end, steps + 1, dtype=torch.float64)
    x_t = ddim_inversion(model, x0, cond, grid, schedule=model.schedule, prediction_type=model.prediction_type,
                         renoise_steps=renoise)
    x = x_t
    with torch.no_grad():
        for i in range(steps, 0, -1):
            out = model(x, grid[i].float().expand(len(x)), cond)
            x = ddim_step(x, out, grid[i], grid[i - 1], eta=0.0, schedule=model.schedule,
                          prediction_type=model.prediction_type).prev_sample
    return (x - x0).pow(2).mean().sqrt().item(), x_t


def _renders():
    images, _ = shapes.render_batch(PROMPTS, seed=1)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 * 2 - 1


# Measured RMSE (model space [-1, 1]), 25 steps: shapes-flow to t = 1: plain 0.028, ReNoise x1 0.0055;
# shapes-vp to t = 0.6: plain 0.0125, ReNoise x1 0.0070 (epsilon outputs near t = 1 divide by alpha -> 0 on its
# cosine schedule, where neither inversion nor sampling is well conditioned).
@pytest.mark.parametrize("name,t_end,tol", [("shapes-flow", 1.0, 0.01), ("shapes-vp", 0.6, 0.01)])
def test_inversion_then_ddim_sampling_reconstructs_the_image(name, t_end, tol):
    model = load_model(name).eval()
    x0 = _renders()
    cond = model.encode_prompts(PROMPTS)
    plain, _ = _reconstruct(model, x0, cond, t_end, 25, 0)
    renoise, x_t = _reconstruct(model, x0, cond, t_end, 25, 1)
    assert renoise < tol and renoise < plain, (plain, renoise)
    assert x_t.std() > 0.3  # it went somewhere noisy, not a no-op


def test_inversion_reconstructs_on_a_tiny_diffusers_pipeline(tmp_path):
    """Random latents of a tiny random SD 1.5 to t = 0.5 in 10 steps: measured RMSE plain 0.044, ReNoise x2 0.0015."""
    pytest.importorskip("diffusers")
    from tiny_pipelines import build_sd

    model = load_model(build_sd(tmp_path / "sd")).eval()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *model.sample_shape, generator=g)
    cond = model.encode_prompts(["a red square", "a blue circle"])
    plain, _ = _reconstruct(model, x0, cond, 0.5, 10, 0)
    renoise, _ = _reconstruct(model, x0, cond, 0.5, 10, 2)
    assert renoise < 0.02 and renoise <= plain, (plain, renoise)


def test_per_sample_grids_and_bad_grids():
    model = load_model("shapes-flow").eval()
    x0, cond = _renders()[:2], model.encode_prompts(PROMPTS[:2])
    grid = torch.stack([torch.linspace(0, 0.3, 4), torch.linspace(0, 0.8, 4)]).double()
    both = ddim_inversion(model, x0, cond, grid, schedule=model.schedule, prediction_type="flow")
    one = ddim_inversion(model, x0[1:], cond[1:] if not hasattr(cond, "tokens") else type(cond)(cond.tokens[1:],
                         cond.pad_mask[1:]), grid[1], schedule=model.schedule, prediction_type="flow")
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)
    traj = ddim_inversion(model, x0, cond, grid[0], schedule=model.schedule, prediction_type="flow",
                          return_trajectory=True)
    assert traj.shape == (2, 4, *x0.shape[1:]) and torch.equal(traj[:, 0], x0)
    with pytest.raises(ValueError, match="ascending"):
        ddim_inversion(model, x0, cond, grid.flip(-1), schedule=model.schedule, prediction_type="flow")
    with pytest.raises(ValueError, match="renoise_steps must be >= 0"):
        ddim_inversion(model, x0, cond, grid, schedule=model.schedule, prediction_type="flow", renoise_steps=-1)
