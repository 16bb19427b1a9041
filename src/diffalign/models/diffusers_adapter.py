"""diffusers pipelines behind diffalign's ``Denoiser`` contract (docs/diffusers.md).

A local pipeline directory (``model_index.json``) is loaded with diffusers' own classes; the UNet /
transformer becomes the trainable backbone and the rest (VAE, text and image encoders, tokenizers)
stays frozen. :class:`DiffusersDenoiser` holds what every architecture shares -- loading, the
frozen parts, the prompt cache, conditioning images, dtype handling, VAE decoding, options and
persistence -- and each architecture is a subclass in ``diffusers_families/`` that says how its
pipeline maps onto the contract:

- **time.** diffalign's ``t`` in ``[0, 1]`` (``t = 1`` noise) becomes the backbone's timestep
  (``_timestep``): the discrete VP step ``k = t T - 1`` (SD, CogVideoX), ``1000 t`` (SD3, Wan,
  HunyuanVideo, SANA), ``t`` (FLUX, Qwen-Image, FLUX.2), ``1 - t`` (Z-Image).
- **schedule.** Built from the scheduler's *config*, never its object (``_schedule``): a
  ``VPSchedule`` from the betas, or a ``FlowSchedule`` whose shift is the config's static shift,
  or the pipeline's resolution-dependent ``mu`` resolved at the adapter's fixed resolution.
- **conditioning.** Prompts go through the pipeline's own ``encode_prompt`` (``_encode``), once
  per distinct prompt (an LRU cache bounded in MiB); ``cond`` is a :class:`DiffusersCond`. A
  prompt may be a ``core.prompts.Prompt`` carrying conditioning images (image-to-video, editing):
  their VAE latents (and image-encoder features) travel in ``cond`` too.
- **latents.** ``sample_shape`` is the pipeline's own noise layout, unpacked: ``(C, H, W)`` for
  images, ``(C, F, H, W)`` for videos; packing into tokens happens inside ``forward``.
- **decode** to images ``[B, 3, H, W]`` or videos ``[B, F, 3, H, W]`` in ``[0, 1]``.

Options that a directory cannot express (resolution, frames, distilled guidance, text length,
...) come from keyword arguments or from ``diffalign.json`` in the pipeline directory.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import from_dict
from ..core.parametrization import check_prediction_type
from ..core.prompts import is_unconditional, load_image, prompt_images
from ..core.schedules import BETA_SCHEDULES, FlowSchedule, Schedule, VPSchedule
from .diffusers_lora import PersistenceMixin, convert_peft_lora  # noqa: F401 - re-exported
from .diffusers_options import (  # noqa: F401 - the options and constants are part of this module's API
    _SAMPLING, _T5_LENGTH, _UNSUPPORTED_FLOW_OPTIONS, FAMILIES, LORA_PATTERNS, LORA_WEIGHT_NAME, OPTIONS_FILE,
    PEFT_WEIGHT_NAME, PIPELINES, AdapterOptions, DiffusersCond, _dtype, calculate_shift, pipeline_class_name,
    read_options, set_attention_backend,
)


def family_class(pipeline_class: str) -> type["DiffusersDenoiser"]:
    """The :class:`DiffusersDenoiser` subclass adapting a pipeline class (imported on demand)."""
    if pipeline_class not in PIPELINES:
        raise ValueError(f"pipeline class {pipeline_class!r} is not supported; supported pipelines: "
                         f"{', '.join(sorted(PIPELINES))}")
    module, _, name = FAMILIES[PIPELINES[pipeline_class]].partition(":")
    return getattr(importlib.import_module(f"{__package__}.diffusers_families.{module}"), name)


class DiffusersDenoiser(PersistenceMixin, nn.Module):
    """A diffusers pipeline as a diffalign ``Denoiser``; ``DiffusersDenoiser(pipe)`` builds the
    subclass of the pipeline's architecture.

    Only the backbone (``self.unet`` or ``self.transformer``) is a registered sub-module, so
    ``parameters()``, ``state_dict()``, peft's LoRA injection, EMA and DDP see the trainable part
    only; the frozen VAE and encoders live in the pipeline object and follow ``.to()``.
    """

    backbone_name = "transformer"
    frozen_names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")
    is_video = False
    ragged_text = False  # text embeddings of variable length under a mask (cached unpadded, padded per batch)
    images_per_prompt: tuple[int, int] = (0, 0)  # conditioning images a prompt must carry (min, max)

    def __new__(cls, *args: Any, **kwargs: Any) -> "DiffusersDenoiser":
        if cls is DiffusersDenoiser and args:
            cls = family_class(type(args[0]).__name__)
        return super().__new__(cls)

    def __init__(self, pipe: Any, *, options: AdapterOptions | None = None, source_dir: str | os.PathLike | None = None):
        super().__init__()
        name = type(pipe).__name__
        if name not in PIPELINES:
            raise ValueError(f"pipeline class {name!r} is not supported; supported pipelines: "
                             f"{', '.join(sorted(PIPELINES))}")
        self.arch = PIPELINES[name]
        self.options = options or AdapterOptions()
        self.source_dir = Path(source_dir) if source_dir is not None else None
        self._pipe = pipe
        backbone = getattr(pipe, self.backbone_name)
        if backbone is None:
            raise ValueError(f"{name} has no {self.backbone_name}")
        setattr(self, self.backbone_name, backbone)  # the one registered sub-module
        for m in self._frozen_modules():
            m.requires_grad_(False).eval()
        if self.options.gradient_checkpointing:
            backbone.enable_gradient_checkpointing()
        if self.options.attention_backend is not None:
            set_attention_backend(backbone, self.options.attention_backend)
        self._text_cache: OrderedDict[tuple, DiffusersCond] = OrderedDict()
        self._ids_cache: dict = {}
        self.vae_factor = self._vae_factor()
        self._check_options()
        self.height, self.width = self._resolution()
        self.mu: float | None = None  # the resolution-dependent shift exponent, when the scheduler is dynamic
        self.prediction_type, self.schedule = self._schedule()
        check_prediction_type(self.prediction_type)
        default = self._guidance_default()
        if default is not None:
            self.guidance = default if self.options.guidance is None else float(self.options.guidance)
        else:
            if self.options.guidance is not None:
                raise ValueError(f"guidance={self.options.guidance} is a distilled guidance scale (FLUX.1-dev, FLUX.2, "
                                 f"HunyuanVideo); this {self.arch} model has no guidance embedding (use "
                                 f"guidance_scale for classifier-free guidance)")
            self.guidance = None
        self.max_sequence_length = self.options.max_sequence_length or _T5_LENGTH.get(self.arch)

    # ----- construction ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        **options: Any) -> "DiffusersDenoiser":
        """Load a local pipeline directory; ``options`` override ``diffalign.json`` (see :class:`AdapterOptions`)."""
        try:
            import diffusers
        except ImportError as e:  # diffusers / transformers are an optional extra
            raise ImportError(f"{directory} is a diffusers pipeline; loading it needs diffusers and transformers "
                              f"(pip install 'diffalign[diffusers]'): {e}") from e

        directory = Path(directory)
        class_name = pipeline_class_name(directory)
        family = family_class(class_name)
        opts = from_dict(AdapterOptions, {**read_options(directory), **options})
        device = torch.device(device)
        dtype = _dtype(opts.dtype, device)
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only torch_dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = getattr(diffusers, class_name).from_pretrained(directory, torch_dtype=dtype, local_files_only=True,
                                                                  **family.load_kwargs(class_name))
        pipe.set_progress_bar_config(disable=True)
        model = family(pipe, options=opts, source_dir=directory)
        return model.to(device).eval()

    @staticmethod
    def load_kwargs(class_name: str) -> dict:
        """Extra keyword arguments of the pipeline's ``from_pretrained`` (e.g. no safety checker)."""
        return {}

    def _frozen_modules(self) -> list[nn.Module]:
        return [m for m in (getattr(self._pipe, n, None) for n in self.frozen_names) if isinstance(m, nn.Module)]

    def _guidance_default(self) -> float | None:
        """The distilled guidance scale of a transformer that embeds one (None: it has none)."""
        return None

    def _check_options(self) -> None:
        """Refuse options this architecture does not use (overridden by families that use them)."""
        if self.options.num_frames is not None or self.options.fps is not None:
            raise ValueError(f"num_frames / fps are video options; this {self.arch} model makes images")

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline (its backbone is this model's backbone)."""
        return self._pipe

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.backbone_name)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The backbone's weight dtype (its first floating parameter; diffusers' ``.dtype`` walks every module)."""
        for p in self.backbone.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def vae(self) -> nn.Module:
        return self._pipe.vae

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for m in self._frozen_modules():
            m._apply(fn)
        self._text_cache.clear()
        self._ids_cache.clear()
        return self

    def __deepcopy__(self, memo: dict) -> "DiffusersDenoiser":
        """Copy the backbone only (a frozen reference model for KL); the pipeline with its frozen
        VAE and text encoders, and the prompt cache, are shared."""
        memo[id(self._pipe)] = self._pipe
        memo[id(self._text_cache)] = self._text_cache
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    # ----- geometry and schedule ---------------------------------------------------------------

    def _vae_factor(self) -> int:
        return int(getattr(self._pipe, "vae_scale_factor", 2 ** (len(self.vae.config.block_out_channels) - 1)))

    @property
    def resolution_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE factor times the backbone's own
        downsampling (transformer patch, 2x2 packing)."""
        return self.vae_factor * 2

    def _native_size(self) -> tuple[int, int]:
        """(H, W) when ``resolution`` is not given: the backbone's ``sample_size`` times the VAE factor."""
        native = self.backbone.config.get("sample_size", None)
        native = native[0] if isinstance(native, (list, tuple)) else (native or 128)
        return native * self.vae_factor, native * self.vae_factor

    def _resolution(self) -> tuple[int, int]:
        size = self.options.size or self._native_size()
        m = self.resolution_multiple
        for side in size:
            if side % m:
                raise ValueError(f"resolution {size[0]}x{size[1]} is not a multiple of {m} (the VAE downsamples by "
                                 f"{self.vae_factor}, the {self.backbone_name} by {m // self.vae_factor} more); "
                                 f"use e.g. {max(m, round(side / m) * m)}")
        return int(size[0]), int(size[1])

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.vae_factor, self.width // self.vae_factor

    @property
    def latent_channels(self) -> int:
        return self.backbone.config.in_channels

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample in model space: the (unpacked) VAE latent ``(C, H / f, W / f)``."""
        return (self.latent_channels, *self.latent_size)

    def _schedule(self) -> tuple[str, Schedule]:
        raise NotImplementedError

    def _vp_schedule(self, cfg: dict) -> tuple[str, VPSchedule]:
        """``VPSchedule`` from a DDPM-family scheduler config (its betas and ``prediction_type``)."""
        if "beta_schedule" not in cfg:
            raise ValueError(f"{self.arch}: scheduler {cfg.get('_class_name')!r} has no beta schedule in its config; "
                             f"expected a DDPM-family scheduler (DDIM, PNDM, Euler, ...)")
        if cfg.get("trained_betas") is not None:
            raise ValueError(f"scheduler config has trained_betas; only beta_schedule in {list(BETA_SCHEDULES)} "
                             "is supported")
        pt = cfg.get("prediction_type", "epsilon")
        if pt not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler prediction_type {pt!r} is not supported")
        return pt, VPSchedule(beta_schedule=cfg["beta_schedule"], beta_start=float(cfg["beta_start"]),
                              beta_end=float(cfg["beta_end"]), num_train_timesteps=int(cfg.get("num_train_timesteps",
                                                                                                 1000)),
                              **self._vp_extras(cfg))

    def _vp_extras(self, cfg: dict) -> dict:
        if cfg.get("rescale_betas_zero_snr"):
            raise ValueError("scheduler config has rescale_betas_zero_snr=True (zero terminal SNR), which this "
                             f"{self.arch} adapter does not model")
        return {}

    def _flow_schedule(self, cfg: dict, *, seq_len: int | None = None, sigma_min: float | None = None,
                       shift_key: str = "shift", mu: float | None = None) -> tuple[str, FlowSchedule]:
        """``FlowSchedule`` from a flow-matching scheduler config. ``seq_len``: the image sequence
        length that a dynamic shift (``use_dynamic_shifting``) is resolved at (``mu`` when the
        pipeline computes it otherwise). ``sigma_min``: ``None`` for the scheduler's own grid when
        called with a step count (``shift(1/T)``), 0 for pipelines that pass ``linspace(1, 1/N, N)``."""
        bad = [k for k in _UNSUPPORTED_FLOW_OPTIONS if cfg.get(k)]
        if bad:
            raise ValueError(f"scheduler config sets {bad}, which diffalign's FlowSchedule does not model")
        T = int(cfg.get("num_train_timesteps", 1000))
        dynamic = bool(cfg.get("use_dynamic_shifting")) and self.options.shift is None
        if self.options.shift is not None:
            shift = float(self.options.shift)
        elif dynamic:
            if mu is None:
                mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                     cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
            self.mu = mu
            shift = float(torch.tensor(mu).exp()) if cfg.get("time_shift_type", "exponential") == "exponential" else mu
        else:
            shift = float(cfg.get(shift_key, 1.0))
        if sigma_min is None:  # the scheduler's own sigma_min: the last training sigma, shifted at init unless dynamic
            s = torch.tensor(1.0 / T, dtype=torch.float32)
            init_shift = 1.0 if dynamic else shift
            sigma_min = float(init_shift * s / (1 + (init_shift - 1) * s))
        return "flow", FlowSchedule(shift=shift, sigma_min=sigma_min,
                                    shift_terminal=float(cfg.get("shift_terminal") or 0.0))

    @property
    def sampling_defaults(self) -> dict:
        d = dict(_SAMPLING[self.arch])
        o = self.options
        for k in ("sampler", "num_steps", "guidance_scale", "eta"):
            if getattr(o, k) is not None:
                d[k] = getattr(o, k)
        if o.sampler is not None and o.eta is None:
            d["eta"] = 0.0 if o.sampler == "ddim" else None
        return d

    # ----- training hooks ----------------------------------------------------------------------

    def trainable_module(self) -> nn.Module:
        """The backbone. Full fine-tuning keeps float32 master weights: a half-precision backbone is
        upcast here (compute stays bf16 under the trainer's autocast)."""
        b = self.backbone
        if self.compute_dtype in (torch.bfloat16, torch.float16):
            b.float()
        return b

    @property
    def lora_target_modules(self) -> list[str]:
        """Exact names (from this model's root) of the backbone's nn.Linear layers LoRA wraps."""
        patterns = self.options.lora_target_modules or LORA_PATTERNS[self.arch]
        rx = re.compile(r"(^|\.)(" + "|".join(f"(?:{p})" for p in patterns) + r")$")
        names = [f"{self.backbone_name}.{n}" for n, m in self.backbone.named_modules()
                 if n and _is_linear(m) and rx.search(n)]
        if not names:
            raise ValueError(f"no nn.Linear in the {self.backbone_name} matches lora_target_modules {list(patterns)}")
        return names

    # ----- prompts and conditioning images -----------------------------------------------------

    def _encode(self, prompts: list[str]) -> DiffusersCond:
        raise NotImplementedError

    def encode_prompts(self, prompts: list[str]) -> DiffusersCond:
        """Prompts -> :class:`DiffusersCond`; each distinct prompt is encoded once (then cached)."""
        from ..core.parametrization import cond_cat, cond_map

        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        lo, hi = self.images_per_prompt
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
            n = len(prompt_images(p))
            if not lo <= n <= hi:
                need = "no conditioning image" if hi == 0 else (
                    f"{lo} conditioning image{'s' if lo > 1 else ''}" if lo == hi else f"{lo} to {hi} conditioning images")
                raise ValueError(f"this {self.arch} model takes {need} per prompt; {p!r} has {n} (prompt files give "
                                 'them as JSONL lines {"prompt": ..., "image": PATH} or "images": [...])')
        if len({len(prompt_images(p)) for p in prompts}) > 1:
            raise ValueError("prompts encoded together must carry the same number of conditioning images, got "
                             f"{sorted({len(prompt_images(p)) for p in prompts})}")
        keys = [(p, is_unconditional(p)) for p in prompts]  # a model may encode its negative branch apart
        rows: dict[tuple, DiffusersCond] = {}
        todo = []
        for key in dict.fromkeys(keys):
            if key in self._text_cache:
                self._text_cache.move_to_end(key)
                rows[key] = self._text_cache[key]
            else:
                todo.append(key)
        with torch.no_grad():
            for i in range(0, len(todo), 32):
                chunk = todo[i:i + 32]
                enc = self._encode([p for p, _ in chunk])
                for j, key in enumerate(chunk):
                    row = rows[key] = cond_map(lambda v: v[j:j + 1].clone(), enc)  # a copy, not a view of the chunk
                    if self.ragged_text:  # drop the chunk's padding: rows are padded again when batched
                        n = int(row.mask.sum())
                        row.embeds, row.mask = row.embeds[:, :n], row.mask[:, :n]
                    self._remember(key, row)
        return cond_cat(*(rows[k] for k in keys))

    def _remember(self, key: tuple, row: DiffusersCond) -> None:
        budget = self.options.text_cache_mb * 2**20
        if budget <= 0:
            return
        self._text_cache[key] = row
        total = sum(r.nbytes() for r in self._text_cache.values())
        while total > budget and self._text_cache:
            _, old = self._text_cache.popitem(last=False)
            total -= old.nbytes()

    def condition_images(self, prompts: list[str], size: tuple[int, int] | bool | None = None) -> list[list[Tensor]]:
        """The conditioning images of each prompt as ``[3, H, W]`` tensors in ``[0, 1]``, resized to
        ``size`` (default: the model's resolution; ``False``: as stored)."""
        size = None if size is False else (size or (self.height, self.width))
        return [[load_image(path, size) for path in prompt_images(p)] for p in prompts]

    # ----- the denoiser ------------------------------------------------------------------------

    def _timestep(self, t: Tensor) -> Tensor:
        return t.float() * 1000

    def _vp_timestep(self, t: Tensor) -> Tensor:
        """The discrete VP step ``k = t T - 1`` (diffalign's grid visits the integer steps)."""
        k = t.double() * self.schedule.num_train_timesteps - 1
        r = k.round()
        return torch.where((k - r).abs() < 1e-3, r, k).float()  # snap float32 noise onto the integer steps

    def _inputs(self, x: Tensor, t: Tensor, cond: DiffusersCond) -> dict:
        """The backbone's keyword arguments for latents ``x`` (compute dtype) at diffalign time ``t``."""
        raise NotImplementedError

    def _output(self, out: Any, x: Tensor) -> Tensor:
        """The backbone's output -> the prediction in ``x``'s (unpacked) layout."""
        return out

    def forward(self, x_t: Tensor, t: Tensor, cond: DiffusersCond) -> Tensor:
        """The backbone's prediction (type ``prediction_type``) at diffalign time ``t`` ([B] in [0, 1]),
        returned in ``x_t``'s dtype."""
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.ndim == 0 else t
        x = x_t.to(self.compute_dtype)
        out = self.backbone(**self._inputs(x, t, cond), return_dict=False)[0]
        return self._output(out, x).to(x_t.dtype)

    def _cast(self, v: Tensor | None) -> Tensor | None:
        return None if v is None else v.to(self.compute_dtype)

    @staticmethod
    def _trim_text(cond: DiffusersCond) -> tuple[Tensor, Tensor | None]:
        """Embeddings and mask cut to the longest real sequence of the batch (right padding); the
        mask is ``None`` when no token is padding, as the pipelines pass it."""
        n = int(cond.mask.sum(1).max())
        embeds, mask = cond.embeds[:, :n], cond.mask[:, :n]
        return embeds, (None if bool(mask.all()) else mask)

    # ----- images ------------------------------------------------------------------------------

    def _vae_factors(self) -> tuple[float, float]:
        c = self.vae.config
        return float(c.scaling_factor), float(c.get("shift_factor", None) or 0.0)

    def decode(self, x: Tensor) -> Tensor:
        """Latents ``[B, *sample_shape]`` -> images ``[B, 3, H, W]`` in ``[0, 1]`` (float32).
        Differentiable in ``x`` (reward-gradient methods); the VAE itself is frozen."""
        scale, shift = self._vae_factors()
        vae = self.vae
        z = x.to(vae.dtype) / scale + shift
        images = [vae.decode(c, return_dict=False)[0] for c in z.split(self.options.decode_batch_size)]
        return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` -> latents (the posterior mean), the inverse of ``decode``."""
        scale, shift = self._vae_factors()
        return ((self._vae_mean(images) - shift) * scale).float()

    def _vae_mean(self, images: Tensor) -> Tensor:
        """Images in ``[0, 1]`` -> the VAE posterior mean (raw, not normalised)."""
        vae = self.vae
        x = images.to(device=self.device, dtype=vae.dtype) * 2 - 1
        out = [vae.encode(c) for c in x.split(self.options.decode_batch_size)]
        # AutoencoderKL*: a Gaussian posterior (its mean); AutoencoderDC (SANA): a deterministic latent
        return torch.cat([o.latent if hasattr(o, "latent") else o.latent_dist.mode() for o in out])


def _is_linear(m: nn.Module) -> bool:
    """An nn.Linear, or a peft layer wrapping one (after LoRA injection)."""
    return isinstance(m, nn.Linear) or isinstance(getattr(m, "base_layer", None), nn.Linear)
