"""Tiny random pipelines of the wave-2 image families (FLUX.1-Kontext, Qwen-Image and its editing
pipeline, FLUX.2 dev and klein, Z-Image, SANA), built offline from configs."""

from __future__ import annotations

from pathlib import Path

IMAGE_BUILDERS: dict = {}

import torch  # noqa: E402

from tiny_pipelines import CHAT_SPECIAL, CHAT_TEMPLATE, _finish, build_flux, byte_tokenizer  # noqa: E402

IMAGE = {"resolution": 32}


def chat_tokenizer(**kw):
    """A byte-level tokenizer with the Qwen chat tokens and a chat template."""
    return byte_tokenizer(CHAT_SPECIAL, eos="<|im_end|>", pad="<|endoftext|>", chat_template=CHAT_TEMPLATE, **kw)


def qwen_vl(tok, hidden: int = 16, layers: int = 2):
    """A tiny Qwen2.5-VL (a 16-wide language model with a one-block vision tower)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tok.convert_tokens_to_ids
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok) + 8, hidden_size=hidden, intermediate_size=37, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, rope_theta=10000.0,
                         bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"))
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, True, True])


def build_qwen_image(path, *, seed: int = 0, options: dict | None = None, size: str = "tiny",
                     edit: bool = False) -> Path:
    """Qwen-Image: Qwen2.5-VL's last hidden layer behind the chat template, an MMDiT with 2x2 packed
    tokens, the published scheduler config (dynamic shift, ``shift_terminal`` 0.02). ``edit``: the
    editing pipeline, whose text encoder also sees the image (a Qwen2-VL processor)."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    torch.manual_seed(seed)
    layers = 2 if size == "tiny" else 4
    tok = chat_tokenizer()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=layers,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                            max_shift=0.9, shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True,
                                            time_shift_type="exponential")
    parts = dict(transformer=transformer, scheduler=sched, vae=qwen_vae(), text_encoder=qwen_vl(tok), tokenizer=tok)
    if not edit:
        return _finish(QwenImagePipeline(**parts), path, {**IMAGE, **(options or {})})
    return QwenImageEditPipeline(processor=qwen_vl_processor(tok), **parts)


def qwen_vl_processor(tok):
    """A Qwen2-VL processor. transformers 5 builds it only with a video processor, which needs
    torchvision; this environment has none, so the (unused) video slot is left empty by skipping
    the class check -- the processor then lives in memory only (it cannot be saved and reloaded)."""
    from unittest import mock

    from transformers import ProcessorMixin, Qwen2VLImageProcessor, Qwen2VLProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56)
    try:
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    except (AttributeError, TypeError, ValueError):  # no torchvision: no video processor
        with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
            return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                    chat_template=CHAT_TEMPLATE)


def build_qwen_image_edit(path=None, **kw):
    """Qwen-Image-Edit, in memory (see ``qwen_vl_processor``): returns the pipeline, not a directory."""
    return build_qwen_image(path, edit=True, **kw)


IMAGE_BUILDERS.update(qwen_image=build_qwen_image, qwen_image_edit=build_qwen_image_edit)


def build_flux_kontext(path, **kw) -> Path:
    """FLUX.1-Kontext: FLUX.1-dev's components behind ``FluxKontextPipeline``."""
    return build_flux(path, pipeline="FluxKontextPipeline", **kw)


IMAGE_BUILDERS["flux_kontext"] = build_flux_kontext
