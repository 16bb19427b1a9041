"""The diffusers adapter on tiny random pipelines of every supported architecture: parity with the
pipelines' own samplers, schedules from scheduler configs, prompt caching, LoRA in diffusers'
format, saving, and bad input."""

import copy
import json
import logging
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers  # noqa: E402

from diffalign.core.sampling import sample, seeded_noise  # noqa: E402
from diffalign.core.schedules import VPSchedule  # noqa: E402
from diffalign.models import load_model  # noqa: E402
from diffalign.models.diffusers_adapter import (  # noqa: E402
    PIPELINES, DiffusersCond, DiffusersDenoiser, calculate_shift, convert_peft_lora)
from diffalign.runtime.lora import apply_lora, lora_targets  # noqa: E402
from tiny_pipelines import BUILDERS, build_flux, build_sd  # noqa: E402

ARCHS = ["sd", "sdxl", "sd3", "flux"]
PROMPTS = ["a red cube", "two blue balls"]
# fp32 on CPU: the adapter and the pipelines run the same operations in a slightly different order
PARITY_RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    dirs = {arch: BUILDERS[arch](root / arch) for arch in ARCHS}
    dirs["sd_v"] = build_sd(root / "sd_v", prediction_type="v_prediction", seed=1)
    dirs["flux_schnell"] = build_flux(root / "flux_schnell", guidance_embeds=False, dynamic_shift=False, seed=2)
    return dirs


def reference_latents(model, directory, arch, guidance_scale, num_steps):
    """The pipeline's own ``__call__(..., output_type="latent")`` from the same noise."""
    pipe = type(model.pipeline).from_pretrained(directory, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    noise = seeded_noise(model.sample_shape, [0, 1])
    kw = dict(prompt=PROMPTS, num_inference_steps=num_steps, output_type="latent", height=model.height,
              width=model.width)
    if arch.startswith("sd") and arch != "sd3":
        # diffalign's uniform VP grid is DDIM's "trailing" spacing ending at abar = 1
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                             set_alpha_to_one=True, clip_sample=False)
        kw.update(latents=noise.clone(), guidance_scale=guidance_scale, eta=0.0)
    elif arch == "sd3":
        kw.update(latents=noise.clone(), guidance_scale=guidance_scale, max_sequence_length=model.max_sequence_length)
    else:  # FLUX: packed latents; distilled guidance; diffalign's CFG is the pipeline's true CFG
        kw.update(latents=model.pack(noise.clone()), max_sequence_length=model.max_sequence_length)
        kw["guidance_scale"] = model.guidance if model.guidance is not None else 0.0
        if guidance_scale != 1:
            kw.update(negative_prompt="", true_cfg_scale=guidance_scale)
    with torch.no_grad():
        out = pipe(**kw).images
    return model.unpack(out, *model.sample_shape[1:]) if arch.startswith("flux") else out


@pytest.mark.parametrize("arch", ARCHS + ["sd_v", "flux_schnell"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_deterministic_sampler_reproduces_the_pipeline(pipes, arch, guidance_scale):
    model = load_model(pipes[arch])
    num_steps = 4  # divides T = 1000, so DDIM's trailing steps are exactly diffalign's grid
    ref = reference_latents(model, pipes[arch], arch, guidance_scale, num_steps)
    sampler = "ddim" if model.schedule.kind == "vp" else "flow_ode"
    with torch.no_grad():
        cond = model.encode_prompts(PROMPTS)
        uncond = model.encode_prompts([""] * len(PROMPTS)) if guidance_scale != 1 else None
        ours = sample(model, cond, sampler=sampler, eta=0.0, num_steps=num_steps, guidance_scale=guidance_scale,
                      noise=seeded_noise(model.sample_shape, [0, 1]), uncond=uncond).x0
    err = (ours - ref).abs().max().item()
    assert err <= PARITY_RTOL * max(1.0, ref.abs().max().item()), (arch, err)


def test_schedules_come_from_the_scheduler_config(pipes):
    sd, sd_v = load_model(pipes["sd"]), load_model(pipes["sd_v"])
    assert sd.schedule == VPSchedule("scaled_linear", 0.00085, 0.012, 1000) and sd.prediction_type == "epsilon"
    assert sd_v.prediction_type == "v_prediction"
    # VP step k sits at t = (k + 1) / T
    assert torch.equal(sd._timestep(torch.tensor([1.0, 0.1, 0.001])), torch.tensor([999.0, 99.0, 0.0]))
    # SD3: static shift 3 and the scheduler's (shifted) sigma_min -> the scheduler's own sigmas
    sd3 = load_model(pipes["sd3"])
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(pipes["sd3"], subfolder="scheduler")
    sched.set_timesteps(7)
    assert sd3.schedule.shift == 3.0
    assert torch.allclose(sd3.schedule.timesteps(7).float(), sched.sigmas, atol=1e-6)
    # FLUX dev: dynamic shifting resolved from the image sequence length, folded into a static shift
    flux = load_model(pipes["flux"])
    h, w = flux.latent_size
    mu = calculate_shift((h // 2) * (w // 2), 256, 4096, 0.5, 1.15)
    assert flux.mu == pytest.approx(mu) and flux.schedule.shift == pytest.approx(math.exp(mu))
    assert flux.schedule.sigma_min == 0
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(pipes["flux"], subfolder="scheduler")
    sched.set_timesteps(sigmas=[1 - i / 6 for i in range(6)], mu=mu)
    assert torch.allclose(flux.schedule.timesteps(6).float(), sched.sigmas, atol=1e-6)
    # the sample shape is the unpacked latent; FLUX packing round-trips
    x = torch.randn(2, *flux.sample_shape)
    assert torch.equal(flux.unpack(flux.pack(x), h, w), x)
    assert flux.sampling_defaults["guidance_scale"] == 1.0 and flux.guidance == 3.5
    schnell = load_model(pipes["flux_schnell"])
    assert schnell.guidance is None and schnell.sampling_defaults["num_steps"] == 4 and schnell.schedule.shift == 3.0


def test_prompts_are_encoded_once_and_batch_independently(pipes, monkeypatch):
    model = load_model(pipes["sdxl"])
    calls = []
    encode = model._encode
    monkeypatch.setattr(model, "_encode", lambda p: calls.append(list(p)) or encode(p))
    a = model.encode_prompts(["x", "a red cube", "x", ""])
    b = model.encode_prompts(["a red cube"])
    assert calls == [["x", "a red cube", ""]]  # distinct prompts, once; the second call is served from the cache
    assert isinstance(a, DiffusersCond) and a.embeds.shape[0] == 4 and a.time_ids.shape == (4, 6)
    assert torch.equal(a.embeds[1], b.embeds[0]) and torch.equal(a.embeds[0], a.embeds[2])
    # SDXL's unconditional embedding is zeros (force_zeros_for_empty_prompt)
    assert a.embeds[3].abs().max() == 0 and a.pooled[3].abs().max() == 0
    assert a.time_ids[0].tolist() == [16, 16, 0, 0, 16, 16]
    model.options.text_cache_mb = 0  # a zero budget disables the cache
    model._text_cache.clear()
    model.encode_prompts(["a red cube"])
    assert calls[-1] == ["a red cube"] and not model._text_cache


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_saved_by_the_adapter_loads_in_plain_diffusers(pipes, arch, tmp_path):
    model = load_model(pipes[arch])
    targets = lora_targets(model)
    assert all(t.startswith(model.backbone_name + ".") for t in targets)
    torch.manual_seed(0)
    peft_model = apply_lora(model, 4, 8, targets)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    # only the backbone's layers are wrapped, nothing of the frozen VAE / text encoders
    assert all(n.startswith(f"base_model.model.{model.backbone_name}.") for n, p in peft_model.named_parameters()
               if p.requires_grad)
    x, t = seeded_noise(model.sample_shape, [0, 1]), torch.tensor([0.7, 0.3])
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        tuned = peft_model(x, t, cond)
        with peft_model.disable_adapter():
            base = peft_model(x, t, cond)
    assert (tuned - base).abs().max() > 1e-3
    peft_model.get_base_model().save_lora(tmp_path / "lora")  # what Trainer.save_final should call
    pipe = type(model.pipeline).from_pretrained(pipes[arch], local_files_only=True)
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        loaded = DiffusersDenoiser(pipe, options=model.options)(x, t, cond)
    assert torch.allclose(loaded, tuned, atol=1e-5)
    # peft's own layout converts to the same diffusers file
    peft_model.save_pretrained(str(tmp_path / "peft"))
    convert_peft_lora(tmp_path / "peft", pipes[arch])
    merged = load_model(pipes[arch])
    merged.load_lora(tmp_path / "peft")
    with torch.no_grad():
        assert torch.allclose(merged(x, t, cond), tuned, atol=1e-5)


def test_a_lora_for_another_model_is_refused(pipes, tmp_path):
    sd3 = load_model(pipes["sd3"])
    peft_model = apply_lora(sd3, 2, 2, lora_targets(sd3))
    peft_model.get_base_model().save_lora(tmp_path / "sd3_lora")
    flux = load_model(pipes["flux"])
    with pytest.raises(ValueError, match="does not match this flux model: .*no such nn.Linear"):
        flux.load_lora(tmp_path / "sd3_lora")
    with pytest.raises(ValueError, match=r"does not match this sd model: it adapts \['transformer'\]"):
        load_model(pipes["sd"]).load_lora(tmp_path / "sd3_lora")
    with pytest.raises(FileNotFoundError, match="holds no LoRA"):
        flux.load_lora(tmp_path)


def test_full_fine_tune_saves_a_loadable_pipeline(pipes, tmp_path):
    model = load_model(pipes["sd3"])
    backbone = model.trainable_module()
    assert backbone is model.transformer and set(model.state_dict()) == {f"transformer.{k}" for k in
                                                                         backbone.state_dict()}
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "tuned")
    again = load_model(tmp_path / "tuned")
    x, t = seeded_noise(model.sample_shape, [3]), torch.tensor([0.5])
    cond = model.encode_prompts(["a red cube"])
    with torch.no_grad():
        assert torch.equal(again(x, t, cond), model(x, t, cond))
    assert json.loads((tmp_path / "tuned" / "diffalign.json").read_text())["resolution"] == [16, 16]
    # plain diffusers loads it too
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "tuned", local_files_only=True)
    assert torch.equal(pipe.transformer.pos_embed.proj.weight, backbone.pos_embed.proj.weight)


def test_frozen_parts_are_shared_by_copies_and_decode_is_differentiable(pipes):
    model = load_model(pipes["flux"])
    ref = copy.deepcopy(model)
    assert ref.transformer is not model.transformer and ref.vae is model.vae
    assert ref.pipeline.text_encoder_2 is model.pipeline.text_encoder_2
    assert not any(p.requires_grad for p in model.vae.parameters())
    x = torch.randn(2, *model.sample_shape, requires_grad=True)
    images = model.decode(x)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    images.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    z = model.encode_images(images.detach())
    assert z.shape == x.shape


def test_bad_input(pipes, tmp_path):
    with pytest.raises(ValueError, match="resolution 18x18 is not a multiple of 4 .the VAE downsamples by 2"):
        DiffusersDenoiser.from_pretrained(pipes["sd3"], resolution=18)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        DiffusersDenoiser.from_pretrained(pipes["flux"], resolution=[16, 18])
    (tmp_path / "kandinsky").mkdir()
    (tmp_path / "kandinsky" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="'KandinskyPipeline' is not supported; supported pipelines: " +
                       ", ".join(sorted(PIPELINES))):
        load_model(tmp_path / "kandinsky")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        load_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        DiffusersDenoiser.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown config key 'resolutoin'; did you mean 'resolution'"):
        DiffusersDenoiser.from_pretrained(pipes["sd"], resolutoin=16)
    with pytest.raises(ValueError, match="is a distilled guidance scale"):
        DiffusersDenoiser.from_pretrained(pipes["sd"], guidance=3.5)
    with pytest.raises(ValueError, match="no nn.Linear in the unet matches"):
        DiffusersDenoiser.from_pretrained(pipes["sd"], lora_target_modules=["nope"]).lora_target_modules
    model = load_model(pipes["sd"])
    peft_model = apply_lora(model, 2, 2, lora_targets(model))
    with pytest.raises(ValueError, match="unmerged LoRA layers"):
        peft_model.get_base_model().save_pretrained(tmp_path / "x")
