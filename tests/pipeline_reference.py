"""The diffusers pipelines' own ``__call__(..., output_type="latent")`` from given noise, for the
parity tests of the wave-2 families: ``REFERENCE[arch](model, directory, prompts, noise,
guidance_scale, num_steps)`` returns latents in the adapter's layout (``model.sample_shape``).

Where diffalign's deterministic sampler differs from the pipeline's own solver only by the
solver (Wan and SANA ship multistep solvers), the pipeline is given the Euler scheduler of the
same flow schedule; where the pipeline feeds guidance differently, the call is set up to mean the
same thing (noted per architecture)."""

from __future__ import annotations

import diffusers
import torch


def _pipe(model, directory):
    pipe = type(model.pipeline).from_pretrained(directory, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(prompts):
    from PIL import Image

    return [Image.open(p.images[0]).convert("RGB") for p in prompts]


def wan(model, directory, prompts, noise, g, steps):
    pipe = _pipe(model, directory)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
    kw = {}
    if model.arch == "wan_i2v":  # one image per call: the pipeline conditions the whole batch on it
        kw["image"] = _images(prompts[:1])[0]
    return pipe(prompt=[str(p) for p in prompts], num_inference_steps=steps, output_type="latent", latents=noise,
                height=model.height, width=model.width, num_frames=model.num_frames, guidance_scale=g,
                max_sequence_length=model.max_sequence_length, **kw).frames


def hunyuan_video(model, directory, prompts, noise, g, steps):
    # diffalign's CFG with the empty negative is the pipeline's true CFG; the distilled guidance stays
    kw = {"negative_prompt": [""] * len(prompts), "true_cfg_scale": g} if g != 1 else {}
    return _pipe(model, directory)(prompt=[str(p) for p in prompts], num_inference_steps=steps, output_type="latent",
                                   latents=noise, height=model.height, width=model.width,
                                   num_frames=model.num_frames, guidance_scale=model.guidance,
                                   max_sequence_length=model.max_sequence_length, **kw).frames


REFERENCE = {"wan": wan, "wan_i2v": wan, "hunyuan_video": hunyuan_video}


def cogvideox(model, directory, prompts, noise, g, steps):
    # the pipeline's latents are [B, F', C, H, W]
    return _pipe(model, directory)(prompt=[str(p) for p in prompts], num_inference_steps=steps, output_type="latent",
                                   latents=noise.transpose(1, 2), height=model.height, width=model.width,
                                   num_frames=model.num_frames, guidance_scale=g, eta=0.0,
                                   max_sequence_length=model.max_sequence_length).frames.transpose(1, 2)


REFERENCE["cogvideox"] = cogvideox
