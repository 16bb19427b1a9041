"""Options, constants and small helpers of the diffusers adapter (``diffusers_adapter.py``)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import check_choice, check_positive, check_range

# pipeline class (model_index.json "_class_name") -> architecture
PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxKontextPipeline": "flux_kontext",
    "WanPipeline": "wan",
    "WanImageToVideoPipeline": "wan_i2v",
    "HunyuanVideoPipeline": "hunyuan_video",
    "CogVideoXPipeline": "cogvideox",
    "QwenImagePipeline": "qwen_image",
    "QwenImageEditPipeline": "qwen_image_edit",
    "Flux2Pipeline": "flux2",
    "Flux2KleinPipeline": "flux2_klein",
    "ZImagePipeline": "z_image",
    "SanaPipeline": "sana",
}
# architecture -> "module:class" of its adapter in diffusers_families/ (imported on demand)
FAMILIES = {
    "sd": "sd:SDDenoiser", "sdxl": "sd:SDXLDenoiser", "sd3": "sd3:SD3Denoiser", "flux": "flux:FluxDenoiser",
    "flux_kontext": "flux:FluxKontextDenoiser", "wan": "wan:WanDenoiser", "wan_i2v": "wan:WanI2VDenoiser",
    "hunyuan_video": "hunyuan_video:HunyuanVideoDenoiser", "cogvideox": "cogvideox:CogVideoXDenoiser",
    "qwen_image": "qwen_image:QwenImageDenoiser", "qwen_image_edit": "qwen_image:QwenImageEditDenoiser",
    "flux2": "flux2:Flux2Denoiser", "flux2_klein": "flux2:Flux2KleinDenoiser", "z_image": "z_image:ZImageDenoiser",
    "sana": "sana:SanaDenoiser",
}
OPTIONS_FILE = "diffalign.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
PEFT_WEIGHT_NAME = "adapter_model.safetensors"

# LoRA targets per architecture: regexes matched against the END of a backbone module name
# (after a dot), on nn.Linear modules only. Attention projections and the feed-forward layers.
_ATTN = (r"to_q", r"to_k", r"to_v", r"to_out\.0")
_JOINT = (r"add_q_proj", r"add_k_proj", r"add_v_proj", r"to_add_out")
_FFN = (r"ff\.net\.0\.proj", r"ff\.net\.2")
_FFN_CONTEXT = (r"ff_context\.net\.0\.proj", r"ff_context\.net\.2")
LORA_PATTERNS = {
    "sd": _ATTN + _FFN,
    "sdxl": _ATTN + _FFN,
    "sd3": _ATTN + _JOINT + _FFN + _FFN_CONTEXT,
    "flux": _ATTN + _JOINT + _FFN + _FFN_CONTEXT + (r"single_transformer_blocks\.\d+\.proj_mlp",
                                                     r"single_transformer_blocks\.\d+\.proj_out"),
    # Wan: self- and cross-attention (attn1, attn2; I2V adds the image key / value projections), the FFN
    "wan": _ATTN + (r"ffn\.net\.0\.proj", r"ffn\.net\.2"),
    "wan_i2v": _ATTN + (r"add_k_proj", r"add_v_proj", r"ffn\.net\.0\.proj", r"ffn\.net\.2"),
    "cogvideox": _ATTN + _FFN,
    # Qwen-Image: joint attention and the image / text MLPs of the dual-stream blocks
    "qwen_image": _ATTN + _JOINT + (r"img_mlp\.net\.0\.proj", r"img_mlp\.net\.2", r"txt_mlp\.net\.0\.proj",
                                    r"txt_mlp\.net\.2"),
}
LORA_PATTERNS["qwen_image_edit"] = LORA_PATTERNS["qwen_image"]
# FLUX.2: joint attention and the SwiGLU feed-forwards of the double blocks, the fused single blocks
LORA_PATTERNS["flux2"] = LORA_PATTERNS["flux2_klein"] = _ATTN + _JOINT + (
    r"ff\.linear_in", r"ff\.linear_out", r"ff_context\.linear_in", r"ff_context\.linear_out",
    r"attn\.to_qkv_mlp_proj", r"single_transformer_blocks\.\d+\.attn\.to_out")
# Z-Image: attention and the SwiGLU feed-forward of every block (the refiners included)
LORA_PATTERNS["sana"] = _ATTN  # SANA's feed-forward is convolutional (GLUMBConv)
LORA_PATTERNS["z_image"] = (r"attention\.to_q", r"attention\.to_k", r"attention\.to_v", r"attention\.to_out\.0",
                            r"feed_forward\.w1", r"feed_forward\.w2", r"feed_forward\.w3")
LORA_PATTERNS["flux_kontext"] = LORA_PATTERNS["hunyuan_video"] = LORA_PATTERNS["flux"]
# what each architecture samples with unless told otherwise (the pipelines' own defaults)
_SAMPLING = {
    "sd": {"sampler": "ddim", "num_steps": 50, "guidance_scale": 7.5, "eta": 0.0},
    "sdxl": {"sampler": "ddim", "num_steps": 50, "guidance_scale": 5.0, "eta": 0.0},
    "sd3": {"sampler": "flow_ode", "num_steps": 28, "guidance_scale": 7.0, "eta": None},
    "flux": {"sampler": "flow_ode", "num_steps": 28, "guidance_scale": 1.0, "eta": None},
    "flux_kontext": {"sampler": "flow_ode", "num_steps": 28, "guidance_scale": 1.0, "eta": None},
    "wan": {"sampler": "flow_ode", "num_steps": 50, "guidance_scale": 5.0, "eta": None},
    "wan_i2v": {"sampler": "flow_ode", "num_steps": 50, "guidance_scale": 5.0, "eta": None},
    "hunyuan_video": {"sampler": "flow_ode", "num_steps": 50, "guidance_scale": 1.0, "eta": None},
    "cogvideox": {"sampler": "ddim", "num_steps": 50, "guidance_scale": 6.0, "eta": 0.0},
    "qwen_image": {"sampler": "flow_ode", "num_steps": 50, "guidance_scale": 4.0, "eta": None},
    "qwen_image_edit": {"sampler": "flow_ode", "num_steps": 50, "guidance_scale": 4.0, "eta": None},
    "flux2": {"sampler": "flow_ode", "num_steps": 50, "guidance_scale": 1.0, "eta": None},
    "flux2_klein": {"sampler": "flow_ode", "num_steps": 50, "guidance_scale": 4.0, "eta": None},
    "z_image": {"sampler": "flow_ode", "num_steps": 50, "guidance_scale": 6.0, "eta": None},  # the pipeline's s = 5
    "sana": {"sampler": "flow_ode", "num_steps": 20, "guidance_scale": 4.5, "eta": None},
}
# the pipelines' default max_sequence_length (text tokens)
_T5_LENGTH = {"sd3": 256, "flux": 512, "flux_kontext": 512, "wan": 512, "wan_i2v": 512, "hunyuan_video": 256, "cogvideox": 226,
              "qwen_image": 1024, "qwen_image_edit": 1024, "flux2": 512, "flux2_klein": 512,
              "z_image": 512, "sana": 300}
_UNSUPPORTED_FLOW_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                             "invert_sigmas", "stochastic_sampling")


@dataclass
class AdapterOptions:
    """Adapter settings: keyword arguments of :meth:`DiffusersDenoiser.from_pretrained`, or the
    keys of ``diffalign.json`` in the pipeline directory (keyword arguments win)."""

    resolution: int | list[int] | None = None  # pixels, int or [height, width]; None: the model's native size
    num_frames: int | None = None  # video models: frames per video (None: the pipeline's default)
    fps: float | None = None  # video models: frames per second of written videos (None: the model's)
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 elsewhere) | float32 | bfloat16 | float16
    guidance: float | None = None  # distilled guidance (FLUX.1-dev, FLUX.2-dev, HunyuanVideo); None: the pipeline's
    max_sequence_length: int | None = None  # text tokens (SD3 256, FLUX 512, ...; see docs/diffusers.md)
    shift: float | None = None  # replaces the scheduler's (static or resolution-dependent) time shift
    sampler: str | None = None  # sampling defaults every command starts from (None: the pipeline's)
    num_steps: int | None = None
    guidance_scale: float | None = None
    eta: float | None = None
    lora_target_modules: list[str] | None = None  # regexes for module-name suffixes; None: per architecture
    gradient_checkpointing: bool = False  # recompute backbone activations in the backward pass
    text_cache_mb: float = 256.0  # LRU cache of prompt embeddings (0 = off)
    decode_batch_size: int = 8  # VAE decode chunk size
    attention_backend: str | None = None  # diffusers' set_attention_backend ("flash", "_native_cudnn", ...); None: SDPA

    def __post_init__(self) -> None:
        if self.resolution is not None:
            res = [self.resolution] * 2 if isinstance(self.resolution, int) else list(self.resolution)
            if len(res) != 2:
                raise ValueError(f"resolution must be an int or [height, width], got {self.resolution!r}")
            for r in res:
                check_positive("resolution", r, integer=True)
        check_choice("dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])
        if self.guidance is not None:
            check_range("guidance", self.guidance, 0, None)
        if self.num_frames is not None:
            check_positive("num_frames", self.num_frames, integer=True)
        if self.fps is not None:
            check_positive("fps", self.fps)
        if self.max_sequence_length is not None:
            check_positive("max_sequence_length", self.max_sequence_length, integer=True)
        if self.shift is not None:
            check_positive("shift", self.shift)
        if self.num_steps is not None:
            check_positive("num_steps", self.num_steps, integer=True)
        if self.guidance_scale is not None:
            check_range("guidance_scale", self.guidance_scale, 0, None)
        check_range("text_cache_mb", self.text_cache_mb, 0, None)
        check_positive("decode_batch_size", self.decode_batch_size, integer=True)
        if self.attention_backend is not None and self.attention_backend.lower().endswith("_hub"):
            raise ValueError(f"attention_backend={self.attention_backend!r} downloads its kernel from the Hugging Face "
                             "Hub at run time; install the kernel's package and name the local backend instead "
                             "(e.g. 'flash', '_flash_3', 'sage')")

    @property
    def size(self) -> tuple[int, int] | None:
        if self.resolution is None:
            return None
        return (self.resolution, self.resolution) if isinstance(self.resolution, int) else tuple(self.resolution)


@dataclass
class DiffusersCond:
    """Encoded prompts, batch on dim 0 (``cond_cat`` / ``cond_index`` batch every tensor field)."""

    embeds: Tensor  # [B, L, D] token embeddings (encoder_hidden_states)
    pooled: Tensor | None = None  # [B, P] pooled embedding (SDXL text_embeds; SD3/FLUX pooled_projections)
    time_ids: Tensor | None = None  # [B, 6] SDXL micro-conditioning (size, crop, target size)
    guidance: Tensor | None = None  # [B] distilled guidance (FLUX.1-dev, FLUX.2-dev, HunyuanVideo)
    mask: Tensor | None = None  # [B, L] 1 for real text tokens, 0 for padding (models that mask padding)
    image_embeds: Tensor | None = None  # [B, N, D] image-encoder features of the conditioning image (Wan I2V)
    image_latents: Tensor | None = None  # [B, ...] VAE latents of the conditioning image(s) (editing, I2V)

    @classmethod
    def cond_cat(cls, conds) -> "DiffusersCond":
        """Batch rows (``core.parametrization.cond_cat``): token sequences of different lengths (rows
        encoded apart, each unpadded) are right-padded with zeros under ``mask`` to the longest."""
        from ..core.parametrization import cond_map

        lengths = {c.embeds.shape[1] for c in conds}
        if len(lengths) > 1:
            if any(c.mask is None for c in conds):
                raise ValueError(f"cannot batch text embeddings of lengths {sorted(lengths)} without a padding mask")
            n = max(lengths)

            def pad(v: Tensor) -> Tensor:
                return torch.nn.functional.pad(v, (0, 0) * (v.ndim - 2) + (0, n - v.shape[1]))

            conds = [dataclasses.replace(c, embeds=pad(c.embeds), mask=pad(c.mask)) for c in conds]
        return cond_map(lambda *xs: torch.cat(xs, dim=0), *conds)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in (self.embeds, self.pooled, self.time_ids, self.guidance,
                                                           self.mask, self.image_embeds, self.image_latents)
                   if v is not None)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent ``mu``: linear in the image sequence length (as in diffusers'
    ``pipeline_flux.calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def read_options(directory: str | os.PathLike) -> dict:
    """``diffalign.json`` of a pipeline directory as a dict ({} when absent)."""
    f = Path(directory) / OPTIONS_FILE
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{f}: expected a JSON object of adapter options, got {type(data).__name__}")
    return data


def pipeline_class_name(directory: str | os.PathLike) -> str:
    index = Path(directory) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{directory} is not a diffusers pipeline directory: {index} is missing")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from None
    if name not in PIPELINES:
        raise ValueError(f"{index}: pipeline class {name!r} is not supported; supported pipelines: "
                         f"{', '.join(sorted(PIPELINES))}")
    return name


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def set_attention_backend(backbone: torch.nn.Module, backend: str) -> None:
    """diffusers' ``set_attention_backend`` on ``backbone``, refused where it would change nothing: in
    diffusers 0.42 only attention processors that dispatch through ``attention_dispatch`` (FLUX's,
    and newer families') read the backend; SD/SDXL UNets and SD3's joint attention call torch's
    ``scaled_dot_product_attention`` directly (which picks flash / memory-efficient kernels itself)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = sorted(b.value for b in AttentionBackendName)
    check_choice("attention_backend", backend.lower(), [n for n in names if not n.endswith("_hub")])
    processors = [getattr(m, "processor", None) for m in backbone.modules()]
    if not any(hasattr(p, "_attention_backend") for p in processors if p is not None):
        raise ValueError(f"attention_backend={backend!r}: the attention processors of this "
                         f"{type(backbone).__name__} do not dispatch through diffusers' attention backends (they call "
                         "torch's scaled_dot_product_attention directly); leave attention_backend unset")
    try:
        backbone.set_attention_backend(backend)
    except (ImportError, RuntimeError) as e:
        raise ValueError(f"attention_backend={backend!r} is not usable here: {e}") from e
