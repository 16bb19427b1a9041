"""The wave-2 diffusers families (Wan 2.1 text- and image-to-video, HunyuanVideo, CogVideoX,
FLUX.1-Kontext, Qwen-Image and Qwen-Image-Edit, FLUX.2 dev and klein, Z-Image, SANA) on tiny random
pipelines: parity with the pipelines' own samplers, LoRA saved in diffusers' format and reloaded
by plain diffusers, conditioning images reaching the backbone, and bad input."""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers  # noqa: E402
from PIL import Image  # noqa: E402

from diffalign.core.prompts import Prompt, negative_prompts  # noqa: E402
from diffalign.core.sampling import sample, seeded_noise  # noqa: E402
from diffalign.models import load_model  # noqa: E402
from diffalign.models.diffusers_adapter import AdapterOptions, DiffusersDenoiser  # noqa: E402
from diffalign.runtime.lora import apply_lora, lora_targets  # noqa: E402
from pipeline_reference import REFERENCE  # noqa: E402

VIDEO = ["wan", "wan_i2v", "wan22_ti2v", "hunyuan_video", "cogvideox"]
IMAGE = ["flux_kontext", "qwen_image", "qwen_image_edit", "flux2", "flux2_klein", "z_image", "sana"]
ARCHS = VIDEO + IMAGE
PROMPTS = ["a red cube", "two blue balls"]
PARITY_RTOL = 1e-5  # as for the first four families: fp32 on CPU, the same operations in another order


pytestmark = pytest.mark.usefixtures("quiet_diffusers")


def load(tiny_pipeline, arch):
    """The adapter on the tiny pipeline, and what plain diffusers loads it from (its directory, or
    for in-memory pipelines the pipeline itself)."""
    built = tiny_pipeline(arch)
    if isinstance(built, diffusers.DiffusionPipeline):
        built.set_progress_bar_config(disable=True)
        return DiffusersDenoiser(built, options=AdapterOptions(resolution=32)), built
    return load_model(built), built


def write_image(path, size, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


def prompts_for(model, tmp_path, texts=PROMPTS, seed=0):
    """Plain prompts, or prompts with one conditioning image at the model's resolution."""
    if not model.images_per_prompt[0]:
        return list(texts)
    image = write_image(tmp_path / f"source{seed}.png", (model.height, model.width), seed)
    return [Prompt(t, [image]) for t in texts]


def guidance_scales(arch):
    return [1.0] if arch == "flux2" else [1.0, 3.0]  # FLUX.2 [dev] is guidance-distilled: no CFG


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_sampler_reproduces_the_pipeline(tiny_pipeline, arch, tmp_path):
    model, source = load(tiny_pipeline, arch)
    prompts = prompts_for(model, tmp_path)
    sampler = "ddim" if model.schedule.kind == "vp" else "flow_ode"
    for g in guidance_scales(arch):
        noise = seeded_noise(model.sample_shape, [0, 1])
        with torch.no_grad():
            ref = REFERENCE[arch](model, source, prompts, noise.clone(), g, 4)
            cond = model.encode_prompts(prompts)
            uncond = model.encode_prompts(negative_prompts(prompts)) if g != 1 else None
            ours = sample(model, cond, sampler=sampler, eta=0.0, num_steps=4, guidance_scale=g, noise=noise,
                          uncond=uncond).x0
        err = (ours - ref).abs().max().item()
        assert err <= PARITY_RTOL * max(1.0, ref.abs().max().item()), (arch, g, err)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_saved_by_the_adapter_loads_in_plain_diffusers(tiny_pipeline, arch, tmp_path):
    model, source = load(tiny_pipeline, arch)
    targets = lora_targets(model)
    assert targets and all(t.startswith(model.backbone_name + ".") for t in targets)
    torch.manual_seed(0)
    peft_model = apply_lora(model, 4, 8, targets)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    x, t = seeded_noise(model.sample_shape, [0, 1]), torch.tensor([0.7, 0.3])
    cond = model.encode_prompts(prompts_for(model, tmp_path))
    with torch.no_grad():
        tuned = peft_model(x, t, cond)
        with peft_model.disable_adapter():
            base = peft_model(x, t, cond)
    assert (tuned - base).abs().max() > 1e-3
    peft_model.get_base_model().save_lora(tmp_path / "lora")
    if isinstance(source, diffusers.DiffusionPipeline):  # in memory: a fresh copy from the same seed
        from tiny_pipelines import all_builders

        pipe = all_builders()[arch]()
    else:
        pipe = type(model.pipeline).from_pretrained(source, local_files_only=True)
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        loaded = DiffusersDenoiser(pipe, options=model.options)(x, t, cond)
    assert torch.allclose(loaded, tuned, atol=1e-5), (loaded - tuned).abs().max()


@pytest.mark.parametrize("arch", ["flux_kontext", "qwen_image_edit", "wan_i2v", "flux2"])
def test_the_conditioning_image_reaches_the_backbone(tiny_pipeline, arch, tmp_path):
    model, _ = load(tiny_pipeline, arch)
    size = (model.height, model.width)
    a, b = (write_image(tmp_path / f"{k}.png", size, seed=k) for k in (1, 2))
    pa, pb = Prompt("make it red", [a]), Prompt("make it red", [b])
    x, t = seeded_noise(model.sample_shape, [0]), torch.tensor([0.6])
    with torch.no_grad():
        out_a, out_b = model(x, t, model.encode_prompts([pa])), model(x, t, model.encode_prompts([pb]))
        again = model(x, t, model.encode_prompts([Prompt("make it red", [a])]))
    assert (out_a - out_b).abs().max() > 1e-4  # another image, another prediction
    assert torch.equal(out_a, again)
    # the unconditional branch keeps the image: guidance moves away from the negative text only
    neg = negative_prompts([Prompt("make it red", [a], negative="blurry")])[0]
    assert neg == Prompt("blurry", [a]) and neg.unconditional
    if arch == "flux2":  # FLUX.2 takes 0 to 10 reference images; without one it is text-to-image
        with torch.no_grad():
            assert (model(x, t, model.encode_prompts(["make it red"])) - out_a).abs().max() > 1e-4
    else:
        with pytest.raises(ValueError, match=f"this {arch} model takes 1 conditioning image per prompt; "
                                             "'make it red' has 0"):
            model.encode_prompts(["make it red"])


def test_conditioning_images_are_resized_to_the_model_resolution(tiny_pipeline, tmp_path):
    model, _ = load(tiny_pipeline, "flux_kontext")
    big = write_image(tmp_path / "big.png", (48, 40), seed=3)
    cond = model.encode_prompts([Prompt("make it red", [big])])
    assert cond.image_latents.shape[-2:] == model.latent_size


def test_unsupported_video_variants_are_refused_with_a_reason(tiny_pipeline):
    model, _ = load(tiny_pipeline, "wan")
    pipe = type(model.pipeline).from_pretrained(tiny_pipeline("wan"), local_files_only=True)
    pipe.register_modules(transformer_2=pipe.transformer)
    with pytest.raises(ValueError, match="two experts .*Wan 2.2 A14B.* not supported"):
        DiffusersDenoiser(pipe)
    with pytest.raises(ValueError, match=r"num_frames=8 must be 4k \+ 1 .*use 5 or 9"):
        DiffusersDenoiser.from_pretrained(tiny_pipeline("wan"), num_frames=8)
    with pytest.raises(ValueError, match="num_frames / fps are video options"):
        DiffusersDenoiser.from_pretrained(tiny_pipeline("qwen_image"), num_frames=9)
    v = load_model(tiny_pipeline("cogvideox"))
    assert v.is_video and v.sample_shape == (4, 3, 4, 4) and v.fps == 8.0
    videos = v.decode(seeded_noise(v.sample_shape, [0]))
    assert videos.shape == (1, 9, 3, 32, 32) and 0 <= videos.min() and videos.max() <= 1


def test_schedules_and_defaults_of_the_wave2_families(tiny_pipeline, tmp_path):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as diffusers_mu

    from diffalign.models.diffusers_families.flux2 import compute_empirical_mu
    from tiny_image import build_flux2_klein

    for seq, steps in [(64, 4), (4096, 28), (4096, 50), (6000, 50)]:
        assert compute_empirical_mu(seq, steps) == pytest.approx(diffusers_mu(seq, steps))
    flux2 = load_model(tiny_pipeline("flux2"))  # mu resolved for diffalign.json's num_steps (4)
    assert flux2.mu == pytest.approx(diffusers_mu(64, 4)) and flux2.guidance == 4.0
    assert flux2.sampling_defaults["guidance_scale"] == 1.0
    distilled = load_model(build_flux2_klein(tmp_path / "klein", distilled=True, options={"num_steps": None}))
    assert distilled.sampling_defaults["num_steps"] == 4 and distilled.sampling_defaults["guidance_scale"] == 1.0
    with pytest.raises(ValueError, match="step-distilled and samples without classifier-free guidance"):
        DiffusersDenoiser.from_pretrained(tmp_path / "klein", guidance_scale=4.0)
    qwen = load_model(tiny_pipeline("qwen_image"))  # the stretched terminal sigma
    assert qwen.schedule.shift_terminal == 0.02 and qwen.schedule.timesteps(10)[-2].item() == pytest.approx(0.02)
    cog = load_model(tiny_pipeline("cogvideox"))
    assert cog.prediction_type == "v_prediction" and cog.schedule.zero_terminal_snr
    assert cog.schedule.alpha_sigma(torch.tensor(1.0))[0].item() == 0.0  # pure noise at t = 1
    assert cog.sampling_defaults == {"sampler": "ddim", "num_steps": 50, "guidance_scale": 6.0, "eta": 0.0}
    z = load_model(tiny_pipeline("z_image"))
    assert torch.equal(z._timestep(torch.tensor([1.0, 0.25])), torch.tensor([0.0, 0.75]))


def test_qwen_images_guidance_rule_is_used_through_wrappers(tiny_pipeline):
    from diffalign.algorithms.forward_process import OldPolicy
    from diffalign.core.parametrization import cfg, guidance_rule

    model = load_model(tiny_pipeline("qwen_image"))
    c, u = torch.randn(2, *model.sample_shape), torch.randn(2, *model.sample_shape)
    renormed = model.combine_guidance(c, u, 4.0)
    # per packed token, the guided prediction has the conditional one's norm (and differs from plain CFG)
    assert torch.allclose(model.pack(renormed).norm(dim=-1), model.pack(c).norm(dim=-1), atol=1e-5)
    assert (renormed - cfg(c, u, 4.0)).abs().max() > 1e-3
    peft_model = apply_lora(model, 2, 2, lora_targets(model))

    class DDPLike(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    old = OldPolicy()
    old.update(peft_model, 0.0)
    for wrapped in (peft_model, DDPLike(peft_model), old.bind(peft_model)):
        assert torch.equal(guidance_rule(wrapped)(c, u, 4.0), renormed)
    assert guidance_rule(load_model(tiny_pipeline("wan"))) is cfg
