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
    heads, layers = (2, 2) if size == "tiny" else (4, 4)
    tok = chat_tokenizer()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=layers,
                                              attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=16,
                                              axes_dims_rope=(8, 4, 4))
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                            max_shift=0.9, shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True,
                                            time_shift_type="exponential")
    parts = dict(transformer=transformer, scheduler=sched, vae=qwen_vae(), text_encoder=qwen_vl(tok), tokenizer=tok)
    if not edit:
        return _finish(QwenImagePipeline(**parts), path, {**IMAGE, **({"resolution": 64} if size == "small" else {}),
                                                          **(options or {})})
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


def flux2_vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                             layers_per_block=1, sample_size=32)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the normalisation is exercised
        vae.bn.running_mean.normal_(0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def flux2_transformer(in_channels: int, joint_dim: int, guidance_embeds: bool, size: str):
    from diffusers import Flux2Transformer2DModel

    heads, layers = (2, 1) if size == "tiny" else (4, 2)
    return Flux2Transformer2DModel(in_channels=in_channels, num_layers=layers, num_single_layers=layers,
                                   attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=joint_dim,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=guidance_embeds)


def flux2_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")


def build_flux2(path, *, seed: int = 0, options: dict | None = None, size: str = "tiny") -> Path:
    """FLUX.2 [dev]: a Mistral-3 text encoder (hidden layers 10, 20, 30 concatenated, behind the
    pipeline's system message, which the byte-level tokenizer spells out byte by byte: 640 tokens),
    a transformer with distilled guidance on 2x2-patchified latents normalised by the VAE's
    BatchNorm statistics, the empirical ``mu``."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    tok = byte_tokenizer(("[INST]", "[/INST]", "[IMG]"), bos="<s>", eos="</s>", pad="<pad>",
                         chat_template=CHAT_TEMPLATE)
    cfg = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tok) + 8, hidden_size=8, intermediate_size=16,
                         num_hidden_layers=31, num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                         max_position_embeddings=1024, pad_token_id=tok.pad_token_id),
        vision_config=dict(model_type="pixtral", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=4, image_size=32, patch_size=16),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"))
    encoder = Mistral3ForConditionalGeneration(cfg).eval()
    pipe = Flux2Pipeline(transformer=flux2_transformer(16, 24, True, size),
                         scheduler=flux2_scheduler(), vae=flux2_vae(), text_encoder=encoder, tokenizer=tok)
    return _finish(pipe, path, {**IMAGE, "max_sequence_length": 640, "num_steps": 4, **(options or {})})


def build_flux2_klein(path, *, seed: int = 0, options: dict | None = None, size: str = "tiny",
                      distilled: bool = False) -> Path:
    """FLUX.2 [klein]: a Qwen3 text encoder (hidden layers 9, 18, 27 concatenated) behind its chat
    template, no guidance embedding (the base model uses classifier-free guidance with the empty
    negative; the distilled one none)."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = chat_tokenizer()
    encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok) + 8, hidden_size=8, intermediate_size=16,
                                           num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=2,
                                           head_dim=4, max_position_embeddings=512,
                                           pad_token_id=tok.pad_token_id)).eval()
    pipe = Flux2KleinPipeline(transformer=flux2_transformer(16, 24, False, size),
                              scheduler=flux2_scheduler(), vae=flux2_vae(), text_encoder=encoder, tokenizer=tok,
                              is_distilled=distilled)
    return _finish(pipe, path, {**IMAGE, "max_sequence_length": 64, "num_steps": 4, **(options or {})})


IMAGE_BUILDERS.update(flux2=build_flux2, flux2_klein=build_flux2_klein)


def build_z_image(path, *, seed: int = 0, options: dict | None = None, size: str = "tiny") -> Path:
    """Z-Image: a Qwen3 text encoder's penultimate hidden states (unpadded, one tensor per prompt)
    behind its chat template, a single-stream DiT taking lists of ``[C, 1, H, W]`` latents and the
    time ``1 - sigma``, the FLUX VAE, a static shift 3 (Z-Image-Turbo's scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from tiny_pipelines import tiny_vae

    torch.manual_seed(seed)
    tok = chat_tokenizer()
    encoder = Qwen3Model(Qwen3Config(vocab_size=len(tok) + 8, hidden_size=16, intermediate_size=37,
                                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                     max_position_embeddings=512, pad_token_id=tok.pad_token_id)).eval()
    small = size == "small"
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4,
                                           dim=64 if small else 32, n_layers=3 if small else 1, n_refiner_layers=1,
                                           n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[16, 8, 8] if small else [8, 4, 4], axes_lens=[256, 32, 32])
    pipe = ZImagePipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                          vae=tiny_vae(shift_factor=0.1159, scaling_factor=0.3611), text_encoder=encoder,
                          tokenizer=tok)
    return _finish(pipe, path, {**IMAGE, "resolution": 32 if small else 16, "max_sequence_length": 64,
                                **(options or {})})


IMAGE_BUILDERS["z_image"] = build_z_image


def build_sana(path, *, seed: int = 0, options: dict | None = None, size: str = "tiny") -> Path:
    """SANA: a Gemma-2 text encoder (the pipeline prepends its "complex human instruction" to the
    prompt, not to the negative), a linear-attention DiT, the deep-compression autoencoder (DC-AE,
    factor 4 here, 32 in SANA), the published flow DPM-Solver config (``flow_shift`` 3)."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tok = byte_tokenizer(("<start_of_turn>", "<end_of_turn>"), bos="<bos>", eos="<eos>", pad="<pad>")
    encoder = Gemma2Model(Gemma2Config(vocab_size=len(tok) + 8, hidden_size=16, intermediate_size=37,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                       max_position_embeddings=2048, pad_token_id=tok.pad_token_id)).eval()
    heads, layers = (2, 1) if size == "tiny" else (4, 3)
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=8,
                                         num_layers=layers, num_cross_attention_heads=heads, cross_attention_head_dim=8,
                                         cross_attention_dim=heads * 8, caption_channels=16, sample_size=8,
                                         patch_size=1)
    vae = AutoencoderDC(latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), upsample_block_type="interpolate",
                        downsample_block_type="stride_conv", decoder_norm_types="rms_norm",
                        decoder_act_fns="silu", scaling_factor=0.41407)
    sched = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    pipe = SanaPipeline(tokenizer=tok, text_encoder=encoder, vae=vae, transformer=transformer, scheduler=sched)
    return _finish(pipe, path, {**IMAGE, "max_sequence_length": 64, **(options or {})})


IMAGE_BUILDERS["sana"] = build_sana
