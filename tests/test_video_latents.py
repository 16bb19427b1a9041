"""Videos through the same contracts: a latent ``[C, F, H, W]`` is just another shape. Steps,
log-probs, guidance, SDE windows and a method's loss give on a video what they give on the same
numbers laid out as an image (the core never looks at the frame axis), and the per-sample means
(log-probs, denoising errors) are the means over frames of the per-frame values."""

import pytest
import torch
from torch import nn

from diffalign import algorithms
from diffalign.algorithms.preference import denoising_error
from diffalign.core.parametrization import guided_prediction
from diffalign.core.sampling import sample, seeded_noise
from diffalign.core.schedules import FlowSchedule, VPSchedule
from diffalign.core.steps import DEFAULT_ETA, SAMPLERS, gaussian_log_prob
from diffalign.rewards import Reward

B, C, F, H, W = 2, 3, 4, 4, 4


def per_frame(x):
    """``[B, C, F, H, W]`` -> the frames as a batch of images ``[B F, C, H, W]``."""
    return x.transpose(1, 2).flatten(0, 1)


CASES = [(s, FlowSchedule(shift=3.0), "flow") for s in sorted(SAMPLERS)] + [("ddim", VPSchedule(), "v_prediction")]


@pytest.mark.parametrize("sampler,schedule,ptype", CASES, ids=[f"{c[0]}-{c[1].kind}" for c in CASES])
def test_a_step_on_a_video_is_the_step_on_each_frame(sampler, schedule, ptype):
    g = torch.Generator().manual_seed(0)
    x, out, noise = (torch.randn(B, C, F, H, W, generator=g) for _ in range(3))
    t, t_prev = torch.tensor([0.8, 0.6]), torch.tensor([0.7, 0.5])
    kw = {"eta": DEFAULT_ETA[sampler], "schedule": schedule, "prediction_type": ptype}
    video = SAMPLERS[sampler](x, out, t, t_prev, noise=noise, **kw)
    frames = SAMPLERS[sampler](per_frame(x), per_frame(out), t.repeat_interleave(F), t_prev.repeat_interleave(F),
                               noise=per_frame(noise), **kw)
    assert torch.allclose(per_frame(video.prev_sample), frames.prev_sample, atol=1e-6)
    # log_prob: the Gaussian log-density averaged over a video's values = the mean over its frames
    assert torch.allclose(video.log_prob, frames.log_prob.view(B, F).mean(1), atol=1e-5)
    if sampler != "flow_ode":
        assert video.log_prob.abs().min() > 0  # a stochastic step: the check is not 0 == 0


def test_gaussian_log_prob_of_a_hand_built_video_is_the_frame_mean():
    x = torch.zeros(1, 1, 2, 1, 1)  # two one-pixel frames
    mean = torch.tensor([0.0, 2.0]).view(1, 1, 2, 1, 1)
    lp = gaussian_log_prob(x, mean, torch.tensor(1.0))
    c = -0.5 * torch.log(torch.tensor(2 * torch.pi))
    assert torch.allclose(lp, torch.tensor([(c + (c - 2.0)) / 2]))  # frame 1: -(0-2)^2/2 = -2


class ElementwiseDenoiser(nn.Module):
    """A prediction that treats every latent value alike (``w x + c(prompt) + t``): whatever the
    layout, the same numbers give the same predictions."""

    prediction_type = "flow"
    schedule = FlowSchedule(shift=2.0)

    def __init__(self, shape):
        super().__init__()
        self.sample_shape = shape
        self.w = nn.Parameter(torch.tensor(0.9))

    def encode_prompts(self, prompts):
        return torch.tensor([[0.1 * len(p)] for p in prompts])

    def forward(self, x_t, t, cond):
        view = (-1,) + (1,) * (x_t.ndim - 1)
        return self.w * x_t + cond.view(view) + torch.as_tensor(t, dtype=x_t.dtype).view(view)

    def decode(self, x):  # both layouts decode to the same videos [B, F, 3, H, W]
        return ((x.reshape(x.shape[0], C, F, H, W).transpose(1, 2) + 1) / 2).clamp(0, 1)


VIDEO_SHAPE, FLAT_SHAPE = (C, F, H, W), (C * F, H, W)


def test_sampling_with_guidance_and_an_sde_window_does_not_see_the_frame_axis():
    runs = {}
    for shape in (VIDEO_SHAPE, FLAT_SHAPE):
        model = ElementwiseDenoiser(shape)
        cond, uncond = model.encode_prompts(["a cat", "two dogs"]), model.encode_prompts(["", ""])
        runs[shape] = sample(model, cond, sampler="flow_sde", num_steps=6, guidance_scale=3.0, uncond=uncond,
                             noise=seeded_noise(shape, [0, 1]), sde_steps=[1, 2], return_trajectory=True,
                             generator=torch.Generator().manual_seed(5))
    v, f = runs[VIDEO_SHAPE], runs[FLAT_SHAPE]
    assert v.x0.shape == (2, *VIDEO_SHAPE) and v.latents.shape == (2, 7, *VIDEO_SHAPE)
    assert torch.allclose(v.x0.reshape(f.x0.shape), f.x0, atol=1e-6)
    assert torch.equal(v.sde_mask, f.sde_mask) and v.sde_mask.tolist() == [False, True, True, False, False, False]
    assert torch.allclose(v.log_probs, f.log_probs, atol=1e-5) and (v.log_probs[:, [0, 3, 4, 5]] == 0).all()
    # guidance on a video: u + w (c - u), both branches in one call
    model = ElementwiseDenoiser(VIDEO_SHAPE)
    x, t = seeded_noise(VIDEO_SHAPE, [3]), torch.tensor([0.5])
    c, u = model.encode_prompts(["a cat"]), model.encode_prompts([""])
    guided = guided_prediction(model, x, t, c, u, 3.0)
    assert torch.allclose(guided, model(x, t, u) + 3.0 * (model(x, t, c) - model(x, t, u)))


class MeanBrightness(Reward):
    name = "mean_brightness"
    differentiable = True

    def score(self, images, prompts, meta):
        return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("method", ["flow_grpo", "mix_grpo"])
def test_a_methods_loss_on_video_latents_is_its_loss_on_the_same_numbers_as_images(method):
    results = {}
    for shape in (VIDEO_SHAPE, FLAT_SHAPE):
        torch.manual_seed(0)
        model = ElementwiseDenoiser(shape)
        cfg = algorithms.build_config(method, {"batch_size": 4, "group_size": 2, "num_steps": 4, "guidance_scale": 2.0,
                                               "micro_batch_size": 4, "beta": 0.0, "timestep_fraction": 1.0})
        algo = algorithms.get(method)[1](cfg, reward=MeanBrightness())
        batch = algo.collect(model, ["a cat", "two dogs"], epoch=0, seed=7)
        losses = []
        for micro in next(iter(algo.minibatches(batch, torch.Generator().manual_seed(1)))):
            loss, _ = algo.loss(model, micro)
            loss.backward()
            losses.append(loss.detach())
        results[shape] = (batch.images, batch.rewards, torch.stack(losses), model.w.grad.clone())
    (iv, rv, lv, gv), (i_f, rf, lf, gf) = results[VIDEO_SHAPE], results[FLAT_SHAPE]
    assert iv.shape == (4, F, 3, H, W) and torch.equal(iv, i_f)
    assert torch.allclose(rv, rf) and rv.std() > 0
    assert torch.allclose(lv, lf, atol=1e-6) and torch.allclose(gv, gf, atol=1e-6) and gv.abs() > 0


def test_the_denoising_error_of_a_video_is_the_mean_over_its_frames():
    model = ElementwiseDenoiser(VIDEO_SHAPE)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(B, C, F, H, W, generator=g) * torch.arange(1, F + 1).view(1, 1, F, 1, 1)  # frames differ
    noise = torch.randn(B, C, F, H, W, generator=g)
    t, cond = torch.tensor([0.3, 0.8]), model.encode_prompts(["a cat", "two dogs"])
    kw = {"schedule": model.schedule, "prediction_type": "flow"}
    video = denoising_error(model, x0, t, noise, cond, **kw)
    frames = denoising_error(model, per_frame(x0), t.repeat_interleave(F), per_frame(noise),
                             cond.repeat_interleave(F, dim=0), **kw)
    assert torch.allclose(video, frames.view(B, F).mean(1), atol=1e-6)
    assert frames.view(B, F).std(1).min() > 0.1  # the frames' errors really differ
