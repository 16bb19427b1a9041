"""Tiny random diffusers pipelines (SD 1.x, SDXL, SD3, FLUX) built offline from configs, the way
diffusers' own test suites build them, and saved with ``save_pretrained``.

Tokenizers come from a generated vocabulary: a byte-level CLIP BPE (every byte is a token, so any
prompt tokenizes) and a unigram T5 vocabulary of characters. Sizes are chosen for a 2-core CPU:
16x16 images, 8x8 latents (VAE factor 2), one or two blocks per model (``size="small"``: wider
backbones and 32x32 images, for benchmarks).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CLIP_MAX_LEN = 32
T5_MAX_LEN = 32
RESOLUTION = 16  # pixels; the tiny VAEs downsample by 2 -> 8x8 latents
# "tiny" for tests; "small" (wider, deeper backbones, 16x16 latents) for benchmarks, where the
# backbone's compute should dominate as it does in real models
SIZES = {
    "tiny": {"resolution": 16, "unet": (8, 16), "unet_layers": 1, "heads": 4, "head_dim": 8, "layers": 2,
             "flux_heads": 2, "flux_layers": 1},
    "small": {"resolution": 32, "unet": (32, 64), "unet_layers": 2, "heads": 4, "head_dim": 16, "layers": 4,
              "flux_heads": 4, "flux_layers": 2},
}


def clip_tokenizer(max_length: int = CLIP_MAX_LEN):
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [("r", "e"), ("c", "u"), ("b", "e</w>"), ("e", "d</w>")]  # a few merges so BPE has something to do
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_text(tokenizer, with_projection: bool = False, hidden: int = 32, projection_dim: int = 32,
              max_positions: int = CLIP_MAX_LEN):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, hidden_size=hidden, intermediate_size=37,
                         layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer) + 8,
                         max_position_embeddings=max_positions, hidden_act="gelu", projection_dim=projection_dim)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg).eval()


def byte_tokenizer(special: tuple[str, ...] = (), *, bos: str | None = None, eos: str = "<|endoftext|>",
                   pad: str | None = None, chat_template: str | None = None, max_length: int = 4096, cls=None):
    """A byte-level BPE tokenizer (every byte is a token, so any text tokenizes) with the special
    tokens a decoder-only text encoder's template needs, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    names = [t for t in dict.fromkeys((*special, bos, eos, pad)) if t]
    kw = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad or eos)) if v}
    out = (cls or PreTrainedTokenizerFast)(tokenizer_object=tok, model_max_length=max_length, **kw)
    out.add_special_tokens({"additional_special_tokens": [t for t in names if t not in kw.values()]})
    if chat_template is not None:
        out.chat_template = chat_template
    return out


# renders {"role", "content"} messages whose content is a string or a list of {"type": "text"} parts
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
                 "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
                 "{% else %}<|image_pad|>{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_SPECIAL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>")


def t5_encoder(tokenizer, d_model: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    cfg = (UMT5Config if umt5 else T5Config)(
        vocab_size=len(tokenizer) + 8, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id)
    return (UMT5EncoderModel if umt5 else T5EncoderModel)(cfg).eval()


def tiny_vae(latent_channels: int = 4, shift_factor: float | None = None, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    kw = {}
    if shift_factor is not None:
        kw = {"shift_factor": shift_factor, "use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=4, layers_per_block=1, sample_size=16,
                         scaling_factor=scaling_factor, **kw)


def _finish(pipe, path: Path, options: dict | None, size: str = "tiny") -> Path:
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    opts = {"resolution": SIZES[size]["resolution"], **(options or {})}
    (path / "diffalign.json").write_text(json.dumps(opts))
    return path


def build_sd(path, *, prediction_type: str = "epsilon", seed: int = 0, options: dict | None = None,
             size: str = "tiny") -> Path:
    """SD 1.x / 2.x: CLIP text encoder, a two-level UNet, PNDM (SD 1.5's scheduler class)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    z = SIZES[size]
    tok = clip_tokenizer()
    unet = UNet2DConditionModel(block_out_channels=z["unet"], layers_per_block=z["unet_layers"], sample_size=8,
                                in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=4)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text(tok), tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return _finish(pipe, path, options, size)


def build_sdxl(path, *, seed: int = 0, options: dict | None = None, size: str = "tiny") -> Path:
    """SDXL: two CLIP encoders (the second with projection -> pooled), text_time micro-conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    z = SIZES[size]
    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    unet = UNet2DConditionModel(block_out_channels=z["unet"], layers_per_block=z["unet_layers"], sample_size=8,
                                in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
                                norm_num_groups=4)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading", interpolation_type="linear")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(scaling_factor=0.13025), text_encoder=clip_text(tok),
                                     text_encoder_2=clip_text(tok2, with_projection=True), tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched)
    return _finish(pipe, path, options, size)


def build_sd3(path, *, seed: int = 0, options: dict | None = None, size: str = "tiny") -> Path:
    """SD3 / SD3.5: two CLIP encoders with projection + T5 (CLIP features zero-padded to the T5
    width, as in SD3), MMDiT with patch size 2, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    z = SIZES[size]
    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    inner = z["heads"] * z["head_dim"]
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=z["layers"],
                                        attention_head_dim=z["head_dim"], num_attention_heads=z["heads"],
                                        caption_projection_dim=inner, joint_attention_dim=64,
                                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip_text(tok, with_projection=True), tokenizer=tok,
        text_encoder_2=clip_text(tok2, with_projection=True), tokenizer_2=tok2,
        text_encoder_3=t5_encoder(tok3, d_model=64), tokenizer_3=tok3)
    return _finish(pipe, path, {"max_sequence_length": T5_MAX_LEN, **(options or {})}, size)


def build_flux(path, *, seed: int = 0, guidance_embeds: bool = True, dynamic_shift: bool = True,
               options: dict | None = None, size: str = "tiny", pipeline: str = "FluxPipeline") -> Path:
    """FLUX.1-dev-like: CLIP (pooled) + T5, packed latents, guidance embedding, dynamic shifting
    (``pipeline="FluxKontextPipeline"``: the same components behind FLUX.1-Kontext's pipeline)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    z = SIZES[size]
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=z["flux_layers"],
                                         num_single_layers=z["flux_layers"], attention_head_dim=16,
                                         num_attention_heads=z["flux_heads"], joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic_shift, base_shift=0.5,
                                            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = getattr(diffusers, pipeline)(transformer=transformer, scheduler=sched,
                        vae=tiny_vae(shift_factor=0.1159, scaling_factor=0.3611),
                        text_encoder=clip_text(tok), tokenizer=tok, text_encoder_2=t5_encoder(tok2), tokenizer_2=tok2)
    return _finish(pipe, path, {"max_sequence_length": T5_MAX_LEN, **(options or {})}, size)


BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux}


def all_builders() -> dict:
    """Every tiny pipeline builder: the four above, the video families and the wave-2 image families."""
    from tiny_image import IMAGE_BUILDERS
    from tiny_video import VIDEO_BUILDERS

    return {**BUILDERS, **VIDEO_BUILDERS, **IMAGE_BUILDERS}
