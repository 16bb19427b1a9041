"""The wave-2 diffusers families (Wan 2.1 text- and image-to-video, HunyuanVideo, CogVideoX,
FLUX.1-Kontext, Qwen-Image and Qwen-Image-Edit, FLUX.2 dev and klein, Z-Image, SANA) on tiny random
pipelines: parity with the pipelines' own samplers, LoRA saved in diffusers' format and reloaded
by plain diffusers, conditioning images reaching the backbone, and bad input."""

import logging

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

VIDEO = ["wan", "wan_i2v", "hunyuan_video", "cogvideox"]
IMAGE = ["flux_kontext", "qwen_image", "qwen_image_edit", "flux2", "flux2_klein", "z_image", "sana"]
ARCHS = VIDEO + IMAGE
PROMPTS = ["a red cube", "two blue balls"]
PARITY_RTOL = 1e-5  # as for the first four families: fp32 on CPU, the same operations in another order


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    logging.getLogger("diffusers").setLevel(logging.ERROR)


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
