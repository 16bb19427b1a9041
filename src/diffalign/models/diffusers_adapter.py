"""diffusers pipelines behind diffalign's ``Denoiser`` contract (docs/diffusers.md).

A local pipeline directory (``model_index.json``) of Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5
or FLUX.1 is loaded with diffusers' own classes; the UNet / transformer becomes the trainable
backbone and the rest (VAE, text encoders, tokenizers) stays frozen. What the adapter maps:

- **time.** diffalign's ``t`` in ``[0, 1]`` (``t = 1`` noise) becomes the backbone's timestep:
  the discrete VP step ``k = t T - 1`` for SD/SDXL (``epsilon`` / ``v_prediction`` / ``sample``
  from the scheduler config), ``sigma * 1000 = 1000 t`` for SD3, ``sigma = t`` for FLUX (its
  transformer multiplies by 1000 itself).
- **schedule.** Built from the scheduler's *config*, never its object: ``VPSchedule`` from the
  betas (SD's ``scaled_linear``); ``FlowSchedule(shift, sigma_min)`` with SD3's static shift and
  the scheduler's shifted ``sigma_min``. FLUX's ``use_dynamic_shifting`` is resolved as the
  pipeline does -- ``mu`` from the image sequence length of the adapter's (fixed) resolution --
  and folded into a static shift ``exp(mu)`` with ``sigma_min = 0`` (FLUX passes the sigmas
  ``linspace(1, 1/N, N)``, which is exactly the ``sigma_min = 0`` grid).
- **conditioning.** Prompts go through the pipeline's own ``encode_prompt`` (SDXL's pooled
  embedding and ``add_time_ids``, SD3's three encoders, FLUX's pooled CLIP + T5), once per
  distinct prompt (an LRU cache bounded in MiB). ``cond`` is a :class:`DiffusersCond`.
- **FLUX latents** are packed (2x2 patches into tokens) inside ``forward``; ``sample_shape`` is the
  *unpacked* VAE latent ``(C, H/8, W/8)``, like every other architecture. FLUX.1-dev's distilled
  guidance travels in ``cond.guidance`` (default 3.5); diffalign's own CFG then runs with
  ``guidance_scale = 1`` (the default sampling setting for FLUX).
- **VAE decode** with ``scaling_factor`` and ``shift_factor`` to images in ``[0, 1]``.

Options that a directory cannot express (resolution, FLUX guidance, T5 length, ...) come from
keyword arguments or from ``diffalign.json`` in the pipeline directory (:class:`AdapterOptions`).
"""

from __future__ import annotations

import copy
import math
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
from ..core.schedules import BETA_SCHEDULES, FlowSchedule, Schedule, VPSchedule
from .diffusers_lora import PersistenceMixin, convert_peft_lora  # noqa: F401 - re-exported
from .diffusers_options import (  # noqa: F401 - the options and constants are part of this module's API
    _SAMPLING, _T5_LENGTH, _UNSUPPORTED_FLOW_OPTIONS, LORA_PATTERNS, LORA_WEIGHT_NAME, OPTIONS_FILE, PEFT_WEIGHT_NAME,
    PIPELINES, AdapterOptions, DiffusersCond, _dtype, calculate_shift, pipeline_class_name, read_options,
    set_attention_backend,
)


class DiffusersDenoiser(PersistenceMixin, nn.Module):
    """A diffusers text-to-image pipeline as a diffalign ``Denoiser``.

    Only the backbone (``self.unet`` or ``self.transformer``) is a registered sub-module, so
    ``parameters()``, ``state_dict()``, peft's LoRA injection, EMA and DDP see the trainable part
    only; the frozen VAE and text encoders live in the pipeline object and follow ``.to()``.
    """

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
        self.backbone_name = "unet" if self.arch in ("sd", "sdxl") else "transformer"
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
        self._text_cache: OrderedDict[str, DiffusersCond] = OrderedDict()
        self._ids_cache: dict = {}
        self.vae_factor = int(getattr(pipe, "vae_scale_factor", 2 ** (len(pipe.vae.config.block_out_channels) - 1)))
        self.height, self.width = self._resolution()
        self.mu: float | None = None  # FLUX's resolution-dependent shift exponent, when the scheduler is dynamic
        self.prediction_type, self.schedule = self._schedule()
        check_prediction_type(self.prediction_type)
        if self.arch == "flux" and backbone.config.get("guidance_embeds", False):
            self.guidance = 3.5 if self.options.guidance is None else float(self.options.guidance)
        else:
            if self.options.guidance is not None:
                raise ValueError(f"guidance={self.options.guidance} is FLUX's distilled guidance; this {self.arch} "
                                 f"model has no guidance embedding (use guidance_scale for classifier-free guidance)")
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
        opts = from_dict(AdapterOptions, {**read_options(directory), **options})
        device = torch.device(device)
        dtype = _dtype(opts.dtype, device)
        extra = {}
        if class_name == "StableDiffusionPipeline":  # no safety checker in a training loop
            extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only torch_dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = getattr(diffusers, class_name).from_pretrained(directory, torch_dtype=dtype, local_files_only=True,
                                                                  **extra)
        pipe.set_progress_bar_config(disable=True)
        model = cls(pipe, options=opts, source_dir=directory)
        return model.to(device).eval()

    def _frozen_modules(self) -> list[nn.Module]:
        names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self._pipe, n, None) for n in names) if isinstance(m, nn.Module)]

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

    @property
    def resolution_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE factor times the backbone's own
        downsampling (UNet levels, transformer patch, FLUX's 2x2 packing)."""
        b = self.backbone.config
        if self.arch in ("sd", "sdxl"):
            return self.vae_factor * 2 ** (len(b.block_out_channels) - 1)
        if self.arch == "sd3":
            return self.vae_factor * b.patch_size
        return self.vae_factor * 2

    def _resolution(self) -> tuple[int, int]:
        size = self.options.size
        if size is None:
            native = self.backbone.config.get("sample_size", None) if self.arch != "flux" else 128
            native = native[0] if isinstance(native, (list, tuple)) else (native or 128)
            size = (native * self.vae_factor,) * 2
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
        c = self.backbone.config.in_channels
        return c // 4 if self.arch == "flux" else c

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """One sample in model space: the (unpacked) VAE latent ``(C, H / f, W / f)``."""
        return (self.latent_channels, *self.latent_size)

    def _schedule(self) -> tuple[str, Schedule]:
        cfg = dict(self._pipe.scheduler.config)
        T = int(cfg.get("num_train_timesteps", 1000))
        if self.arch in ("sd", "sdxl"):
            if "beta_schedule" not in cfg:
                raise ValueError(f"{self.arch}: scheduler {cfg.get('_class_name')!r} has no beta schedule in its config; "
                                 f"expected a DDPM-family scheduler (DDIM, PNDM, Euler, ...)")
            if cfg.get("trained_betas") is not None:
                raise ValueError("scheduler config has trained_betas; only beta_schedule in "
                                 f"{list(BETA_SCHEDULES)} is supported")
            if cfg.get("rescale_betas_zero_snr"):
                raise ValueError("scheduler config has rescale_betas_zero_snr=True (zero terminal SNR), which "
                                 "diffalign's VPSchedule does not model")
            pt = cfg.get("prediction_type", "epsilon")
            if pt not in ("epsilon", "v_prediction", "sample"):
                raise ValueError(f"scheduler prediction_type {pt!r} is not supported")
            return pt, VPSchedule(beta_schedule=cfg["beta_schedule"], beta_start=float(cfg["beta_start"]),
                                  beta_end=float(cfg["beta_end"]), num_train_timesteps=T)
        if "FlowMatch" not in str(cfg.get("_class_name", "FlowMatch")):
            raise ValueError(f"{self.arch}: expected a flow-matching scheduler, got {cfg.get('_class_name')!r}")
        bad = [k for k in _UNSUPPORTED_FLOW_OPTIONS if cfg.get(k)]
        if bad:
            raise ValueError(f"scheduler config sets {bad}, which diffalign's FlowSchedule does not model")
        dynamic = bool(cfg.get("use_dynamic_shifting")) and self.options.shift is None
        if self.options.shift is not None:
            shift = float(self.options.shift)
        elif dynamic:
            shift = self._dynamic_shift(cfg)
        else:
            shift = float(cfg.get("shift", 1.0))
        if self.arch == "flux":
            sigma_min = 0.0  # FluxPipeline passes sigmas linspace(1, 1/N, N): the sigma_min = 0 grid
        else:
            # the scheduler's own sigma_min: the last training sigma, shifted at init unless dynamic (float32)
            s = torch.tensor(1.0 / T, dtype=torch.float32)
            init_shift = 1.0 if dynamic else shift
            sigma_min = float(init_shift * s / (1 + (init_shift - 1) * s))
        return "flow", FlowSchedule(shift=shift, sigma_min=sigma_min)

    def _dynamic_shift(self, cfg: dict) -> float:
        h, w = self.latent_size
        p = 2 if self.arch == "flux" else self.backbone.config.patch_size
        mu = calculate_shift((h // p) * (w // p), cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        self.mu = mu
        return math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu

    @property
    def sampling_defaults(self) -> dict:
        d = dict(_SAMPLING[self.arch])
        if self.arch == "flux" and self.guidance is None:  # FLUX.1-schnell: 4 steps, no guidance
            d["num_steps"] = 4
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

    # ----- prompts -----------------------------------------------------------------------------

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> DiffusersCond:
        pipe, dev, n = self._pipe, self.device, len(prompts)
        if self.arch == "sd":
            embeds, _ = pipe.encode_prompt(prompts, dev, 1, False)
            return DiffusersCond(embeds)
        if self.arch == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=dev, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            if pipe.config.get("force_zeros_for_empty_prompt", False):
                # SDXL's unconditional embedding is zeros (the pipeline's negative prompt when none is given)
                empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
                embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
                pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
            proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
            size = (self.height, self.width)
            time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=proj)
            return DiffusersCond(embeds, pooled, time_ids.to(dev).expand(n, -1).contiguous())
        if self.arch == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=dev,
                                                      num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                      max_sequence_length=self.max_sequence_length)
            return DiffusersCond(embeds, pooled)
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=dev, num_images_per_prompt=1,
                                               max_sequence_length=self.max_sequence_length)
        guidance = None if self.guidance is None else torch.full((n,), self.guidance, device=dev, dtype=torch.float32)
        return DiffusersCond(embeds, pooled, guidance=guidance)

    def encode_prompts(self, prompts: list[str]) -> DiffusersCond:
        """Prompts -> :class:`DiffusersCond`; each distinct prompt is encoded once (then cached)."""
        from ..core.parametrization import cond_cat, cond_map

        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
        rows: dict[str, DiffusersCond] = {}
        todo = []
        for p in dict.fromkeys(prompts):
            if p in self._text_cache:
                self._text_cache.move_to_end(p)
                rows[p] = self._text_cache[p]
            else:
                todo.append(p)
        for i in range(0, len(todo), 32):
            chunk = todo[i:i + 32]
            enc = self._encode(chunk)
            for j, p in enumerate(chunk):
                rows[p] = cond_map(lambda v: v[j:j + 1].clone(), enc)  # a copy, not a view of the chunk
                self._remember(p, rows[p])
        return cond_cat(*(rows[p] for p in prompts))

    def _remember(self, prompt: str, row: DiffusersCond) -> None:
        budget = self.options.text_cache_mb * 2**20
        if budget <= 0:
            return
        self._text_cache[prompt] = row
        total = sum(r.nbytes() for r in self._text_cache.values())
        while total > budget and self._text_cache:
            _, old = self._text_cache.popitem(last=False)
            total -= old.nbytes()

    # ----- the denoiser ------------------------------------------------------------------------

    def _timestep(self, t: Tensor) -> Tensor:
        if self.arch in ("sd", "sdxl"):
            k = t.double() * self.schedule.num_train_timesteps - 1
            r = k.round()
            return torch.where((k - r).abs() < 1e-3, r, k).float()  # snap float32 noise onto the integer steps
        if self.arch == "sd3":
            return t.float() * self._pipe.scheduler.config.num_train_timesteps
        return t  # FLUX's transformer scales by 1000 itself

    def _flux_ids(self, n_txt: int, h: int, w: int, device, dtype) -> tuple[Tensor, Tensor]:
        key = (n_txt, h, w, device, dtype)
        if key not in self._ids_cache:
            img = torch.zeros(h // 2, w // 2, 3)
            img[..., 1] += torch.arange(h // 2)[:, None]
            img[..., 2] += torch.arange(w // 2)[None, :]
            self._ids_cache[key] = (torch.zeros(n_txt, 3, device=device, dtype=dtype),
                                    img.reshape(-1, 3).to(device=device, dtype=dtype))
        return self._ids_cache[key]

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        """FLUX packing: ``[B, C, H, W]`` -> ``[B, H/2 * W/2, 4C]`` (2x2 patches as tokens)."""
        B, C, H, W = x.shape
        return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)

    @staticmethod
    def unpack(x: Tensor, H: int, W: int) -> Tensor:
        B, _, D = x.shape
        return x.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, H, W)

    def forward(self, x_t: Tensor, t: Tensor, cond: DiffusersCond) -> Tensor:
        """The backbone's prediction (type ``prediction_type``) at diffalign time ``t`` ([B] in [0, 1]),
        returned in ``x_t``'s dtype."""
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.ndim == 0 else t
        backbone = self.backbone
        dtype = self.compute_dtype
        x = x_t.to(dtype)
        embeds = cond.embeds.to(dtype)
        pooled = None if cond.pooled is None else cond.pooled.to(dtype)
        if self.arch in ("sd", "sdxl"):
            added = None
            if self.arch == "sdxl":
                added = {"text_embeds": pooled, "time_ids": cond.time_ids.to(dtype)}
            out = backbone(x, self._timestep(t), encoder_hidden_states=embeds, added_cond_kwargs=added,
                           return_dict=False)[0]
        elif self.arch == "sd3":
            out = backbone(hidden_states=x, timestep=self._timestep(t), encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]
        else:
            H, W = x.shape[-2:]
            txt_ids, img_ids = self._flux_ids(embeds.shape[1], H, W, x.device, dtype)
            guidance = cond.guidance
            if self.guidance is not None and guidance is None:
                raise ValueError("this FLUX transformer embeds guidance; cond.guidance is missing (use encode_prompts)")
            out = backbone(hidden_states=self.pack(x), timestep=t.to(dtype), guidance=guidance,
                           pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
                           return_dict=False)[0]
            out = self.unpack(out, H, W)
        return out.to(x_t.dtype)

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
        vae = self.vae
        x = images.to(device=self.device, dtype=vae.dtype) * 2 - 1
        z = torch.cat([vae.encode(c).latent_dist.mean for c in x.split(self.options.decode_batch_size)])
        return ((z - shift) * scale).float()


def _is_linear(m: nn.Module) -> bool:
    """An nn.Linear, or a peft layer wrapping one (after LoRA injection)."""
    return isinstance(m, nn.Linear) or isinstance(getattr(m, "base_layer", None), nn.Linear)
