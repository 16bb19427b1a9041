"""The diffusers pipelines' own ``__call__(..., output_type="latent")`` from given noise, for the
parity tests of the wave-2 families: ``REFERENCE[arch](model, directory, prompts, noise,
guidance_scale, num_steps)`` returns latents in the adapter's layout (``model.sample_shape``).

Where diffalign's deterministic sampler differs from the pipeline's own solver only by the
solver (Wan and SANA ship multistep solvers), the pipeline is given the Euler scheduler of the
same flow schedule; where the pipeline feeds guidance differently, the call is set up to mean the
same thing (noted per architecture)."""

from __future__ import annotations

from pathlib import Path

import diffusers


def _pipe(model, directory):
    if not isinstance(directory, (str, Path)):  # an in-memory pipeline (Qwen-Image-Edit): the model's own
        return directory
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


REFERENCE = {"wan": wan, "wan_i2v": wan, "wan22_ti2v": wan, "hunyuan_video": hunyuan_video}


def cogvideox(model, directory, prompts, noise, g, steps):
    # the pipeline's latents are [B, F', C, H, W]
    return _pipe(model, directory)(prompt=[str(p) for p in prompts], num_inference_steps=steps, output_type="latent",
                                   latents=noise.transpose(1, 2), height=model.height, width=model.width,
                                   num_frames=model.num_frames, guidance_scale=g, eta=0.0,
                                   max_sequence_length=model.max_sequence_length).frames.transpose(1, 2)


REFERENCE["cogvideox"] = cogvideox


def qwen_image(model, directory, prompts, noise, g, steps):
    pipe = _pipe(model, directory)
    kw = {"negative_prompt": [str(p) for p in _negatives(prompts)], "true_cfg_scale": g} if g != 1 else {}
    if model.arch == "qwen_image_edit":
        import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit

        # the pipeline resizes the image to ~1 megapixel; diffalign (and this reference) keep the model's size
        edit.calculate_dimensions = lambda area, ratio: (model.width, model.height, None)
        kw["image"] = _images(prompts)  # one per prompt (the processor needs as many images as image slots)
    out = pipe(prompt=[str(p) for p in prompts], num_inference_steps=steps, output_type="latent",
               latents=model.pack(noise), height=model.height, width=model.width,
               max_sequence_length=model.max_sequence_length, **kw).images
    return model.unpack(out, *noise.shape[-2:])


def _negatives(prompts):
    from diffalign.core.prompts import negative_prompts

    return negative_prompts(prompts)


REFERENCE.update(qwen_image=qwen_image, qwen_image_edit=qwen_image)


def flux_kontext(model, directory, prompts, noise, g, steps):
    # the distilled guidance stays; diffalign's CFG is the pipeline's true CFG with the negative prompt
    kw = {"negative_prompt": [str(p) for p in _negatives(prompts)], "true_cfg_scale": g} if g != 1 else {}
    out = _pipe(model, directory)(
        image=_images(prompts), prompt=[str(p) for p in prompts], num_inference_steps=steps, output_type="latent",
        latents=model.pack(noise), height=model.height, width=model.width, guidance_scale=model.guidance,
        max_sequence_length=model.max_sequence_length, max_area=model.height * model.width,
        _auto_resize=False, **kw).images
    return model.unpack(out, *noise.shape[-2:])


REFERENCE["flux_kontext"] = flux_kontext


def flux2(model, directory, prompts, noise, g, steps):
    pipe = _pipe(model, directory)
    kw = {"image": _images(prompts)[0]} if prompt_images(prompts[0]) else {}
    if model.arch == "flux2":  # guidance-distilled: the scale is the transformer's input, no CFG
        assert g == 1, "FLUX.2 [dev] samples without classifier-free guidance"
        kw["guidance_scale"] = model.guidance
    else:  # klein: CFG against the empty prompt
        kw["guidance_scale"] = g
    out = pipe(prompt=[str(p) for p in prompts], num_inference_steps=steps, output_type="latent", latents=noise,
               height=model.height, width=model.width, max_sequence_length=model.max_sequence_length, **kw).images
    if model.arch == "flux2":  # packed tokens [B, h w, C]
        B, C, h, w = noise.shape
        return out.transpose(1, 2).reshape(B, C, h, w)
    return model._to_model(out)  # klein returns the VAE latent


def prompt_images(p):
    return getattr(p, "images", ())


REFERENCE.update(flux2=flux2, flux2_klein=flux2)


def z_image(model, directory, prompts, noise, g, steps):
    # the pipeline's guidance pos + s (pos - neg) is diffalign's w = s + 1
    return _pipe(model, directory)(prompt=[str(p) for p in prompts], num_inference_steps=steps, output_type="latent",
                                   latents=noise, height=model.height, width=model.width, guidance_scale=g - 1,
                                   max_sequence_length=model.max_sequence_length).images


REFERENCE["z_image"] = z_image


def sana(model, directory, prompts, noise, g, steps):
    pipe = _pipe(model, directory)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
    return pipe(prompt=[str(p) for p in prompts], num_inference_steps=steps, output_type="latent", latents=noise,
                height=model.height, width=model.width, guidance_scale=g, use_resolution_binning=False,
                max_sequence_length=model.max_sequence_length).images


REFERENCE["sana"] = sana
