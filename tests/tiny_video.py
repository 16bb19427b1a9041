"""Tiny random video pipelines (Wan 2.1 text- and image-to-video, HunyuanVideo, CogVideoX) built
offline from configs and saved with ``save_pretrained``: 32x32 pixels, 9 frames (3 latent frames of
4x4), two transformer blocks, so a parity run takes a fraction of a second on one CPU thread."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_pipelines import _finish, byte_tokenizer, clip_text, clip_tokenizer, t5_encoder, t5_tokenizer

VIDEO = {"resolution": 32, "num_frames": 9}
SMALL = {"resolution": 64}  # size="small" (benchmarks): 4x4 -> 8x8 latent positions per frame, wider backbones


def _save(pipe, path, options, size="tiny"):
    return _finish(pipe, path, {**VIDEO, "max_sequence_length": 32, **(SMALL if size == "small" else {}),
                                **(options or {})})


def wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def build_wan(path, *, seed: int = 0, options: dict | None = None, size: str = "tiny", i2v: bool = False,
              expand_timesteps: bool = False) -> Path:
    """Wan 2.1: UMT5 text, a video DiT with patch (1, 2, 2), the published UniPC flow scheduler
    (``flow_shift`` 3). ``i2v``: 36 input channels and a CLIP vision encoder (image-to-video).
    ``expand_timesteps``: Wan 2.2 TI2V-5B's text-to-video mode (a timestep per latent token)."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    heads, head_dim, layers = (2, 12, 2) if size == "tiny" else (4, 16, 4)
    inner = heads * head_dim
    tok = t5_tokenizer()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=36 if i2v else 16,
        out_channels=16, text_dim=32, freq_dim=32, ffn_dim=2 * inner, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=32 if i2v else None,
        added_kv_proj_dim=inner if i2v else None)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    parts = dict(tokenizer=tok, text_encoder=t5_encoder(tok, umt5=True), vae=wan_vae(), transformer=transformer,
                 scheduler=sched)
    if not i2v:
        return _save(WanPipeline(expand_timesteps=expand_timesteps, **parts), path, options, size)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                              num_hidden_layers=2, image_size=32, patch_size=8, projection_dim=32))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _save(WanImageToVideoPipeline(image_encoder=vision.eval(), image_processor=processor, **parts), path,
                 options, size)


def build_wan_i2v(path, **kw) -> Path:
    return build_wan(path, i2v=True, **kw)


def build_wan22_ti2v(path, **kw) -> Path:
    return build_wan(path, expand_timesteps=True, **kw)


VIDEO_BUILDERS = {"wan": build_wan, "wan_i2v": build_wan_i2v, "wan22_ti2v": build_wan22_ti2v}


def build_hunyuan_video(path, *, seed: int = 0, options: dict | None = None, size: str = "tiny") -> Path:
    """HunyuanVideo: a Llama text encoder behind the pipeline's chat template (its hidden states
    two layers from the top, the template's first 95 tokens cropped), CLIP pooled, a dual-stream
    then single-stream DiT with guidance embedding, the static flow shift 7. The byte-level
    tokenizer spells the template out byte by byte, so the tiny pipeline keeps 640 tokens after the
    crop to reach the prompt (real: 256)."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    heads, head_dim, layers = (2, 8, 1) if size == "tiny" else (4, 16, 2)
    tok = byte_tokenizer(("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), bos="<|begin_of_text|>",
                         eos="<|end_of_text|>", pad="<|end_of_text|>")
    llama = LlamaModel(LlamaConfig(vocab_size=len(tok) + 8, hidden_size=16, intermediate_size=37, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                                   pad_token_id=tok.pad_token_id)).eval()
    tok2 = clip_tokenizer(77)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_single_layers=layers, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=32, rope_axes_dim=(2, 2, 4) if size == "tiny" else (4, 6, 6))
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4, mid_block_add_attention=False)
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tok, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                text_encoder_2=clip_text(tok2, max_positions=77), tokenizer_2=tok2)
    return _save(pipe, path, {"max_sequence_length": 640, **(options or {})}, size)


VIDEO_BUILDERS["hunyuan_video"] = build_hunyuan_video


def build_cogvideox(path, *, seed: int = 0, options: dict | None = None, size: str = "tiny") -> Path:
    """CogVideoX 1.0: T5 text, an expert-transformer DiT with 2x2 patches, v-prediction on the
    CogVideoX DDIM scheduler (zero terminal SNR, SNR shift 3, trailing steps) -- CogVideoX-2b's."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    torch.manual_seed(seed)
    heads, head_dim, layers = (2, 8, 1) if size == "tiny" else (4, 16, 3)
    tok = t5_tokenizer()
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=layers, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=32)
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    sched = CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
                                   set_alpha_to_one=True, timestep_spacing="trailing", clip_sample=False)
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=t5_encoder(tok), vae=vae, transformer=transformer,
                             scheduler=sched)
    return _save(pipe, path, options, size)


VIDEO_BUILDERS["cogvideox"] = build_cogvideox
