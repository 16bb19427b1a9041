"""Persistence of the diffusers adapter: pipeline directories and LoRA weights in the layouts
plain diffusers (``pipe.load_lora_weights``) and peft read. Mixed into ``DiffusersDenoiser``."""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .diffusers_options import LORA_WEIGHT_NAME, OPTIONS_FILE, PEFT_WEIGHT_NAME


class PersistenceMixin:
    # ----- persistence -------------------------------------------------------------------------

    def _lora_layers(self) -> dict[str, nn.Module]:
        try:
            from peft.tuners.lora import LoraLayer
        except ImportError:  # pragma: no cover - peft is a core dependency
            return {}
        return {n: m for n, m in self.backbone.named_modules() if isinstance(m, LoraLayer)}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write a pipeline directory that ``load_model`` and diffusers' ``from_pretrained`` load: the
        backbone's current weights plus the source pipeline's other components (hard links where the
        file system allows, else copies) and ``diffalign.json``."""
        if self._lora_layers():
            raise ValueError("the backbone holds unmerged LoRA layers; merge them first (peft's merge_and_unload) "
                             "or save the adapter alone with save_lora(dir)")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        src = self.source_dir
        if src is not None and src.resolve() != out.resolve():
            index = json.loads((src / "model_index.json").read_text())
            parts = [k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None]
            for name in ["model_index.json", *parts]:
                item = src / name
                if name == self.backbone_name or not item.exists():
                    continue
                dst = out / item.name
                if dst.exists():
                    shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
                if item.is_dir():
                    shutil.copytree(item, dst, copy_function=_link_or_copy)
                else:
                    _link_or_copy(item, dst)
        elif src is None:  # built in memory: let diffusers write every component
            self._pipe.save_pretrained(out, safe_serialization=True)
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{self.backbone_name}."))
        try:
            self.backbone.save_pretrained(tmp, safe_serialization=True)
            final = out / self.backbone_name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        opts = asdict(self.options)
        opts["resolution"] = [self.height, self.width]
        (out / OPTIONS_FILE).write_text(json.dumps(opts, indent=2) + "\n")

    def save_lora(self, directory: str | os.PathLike) -> Path:
        """Write the LoRA layers peft injected into the backbone in diffusers' format
        (``pytorch_lora_weights.safetensors`` with the adapter config as metadata), loadable with
        ``pipe.load_lora_weights(directory)``. Call it before ``merge_and_unload``."""
        layers = self._lora_layers()
        if not layers:
            raise ValueError("the backbone has no LoRA layers to save (train with lora_rank > 0)")
        state, r, alpha = {}, None, None
        for name, m in layers.items():
            adapter = m.active_adapters[0]
            if adapter not in m.lora_A:
                continue
            state[f"{name}.lora_A.weight"] = m.lora_A[adapter].weight.detach().float().cpu().contiguous()
            state[f"{name}.lora_B.weight"] = m.lora_B[adapter].weight.detach().float().cpu().contiguous()
            rank = int(m.r[adapter])
            a = float(m.scaling[adapter]) * rank  # alpha with which diffusers' alpha / r reproduces the scaling
            if r is None:
                r, alpha = rank, a
            elif (rank, a) != (r, alpha):
                raise ValueError("save_lora supports one rank and alpha for every layer")
        return self._write_lora(directory, state, r, alpha)

    def _write_lora(self, directory, state: dict[str, Tensor], r: int, alpha: float) -> Path:
        from peft import LoraConfig

        modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
        meta = LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0).to_dict()
        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
        meta["peft_type"] = str(getattr(meta["peft_type"], "value", meta["peft_type"]))
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save = type(self._pipe).save_lora_weights
        if "transformer_lora_adapter_metadata" in inspect.signature(save).parameters or \
                "unet_lora_adapter_metadata" in inspect.signature(save).parameters:
            save(out, **{f"{self.backbone_name}_lora_layers": state,
                         f"{self.backbone_name}_lora_adapter_metadata": meta})
        else:  # older diffusers: no metadata, so loaders assume alpha = r; bake alpha / r into lora_B
            s = alpha / r
            save(out, **{f"{self.backbone_name}_lora_layers": {
                k: v * s if ".lora_B." in k else v for k, v in state.items()}})
        return out / LORA_WEIGHT_NAME

    def read_lora(self, directory: str | os.PathLike) -> tuple[dict[str, tuple[Tensor, Tensor]], float]:
        """A LoRA directory (diffusers' ``pytorch_lora_weights.safetensors`` or peft's
        ``adapter_model.safetensors`` + ``adapter_config.json``) -> ``({module: (A, B)}, scaling)``,
        module names relative to the backbone, checked against this model."""
        from safetensors import safe_open

        d = Path(directory)
        prefix = f"{self.backbone_name}."
        if (d / LORA_WEIGHT_NAME).is_file():
            with safe_open(str(d / LORA_WEIGHT_NAME), "pt") as f:
                raw = {k: f.get_tensor(k) for k in f.keys()}
                meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
            r = meta.get(f"{prefix}r")
            alpha = meta.get(f"{prefix}lora_alpha", r)
        elif (d / PEFT_WEIGHT_NAME).is_file() and (d / "adapter_config.json").is_file():
            with safe_open(str(d / PEFT_WEIGHT_NAME), "pt") as f:
                raw = {k.removeprefix("base_model.model."): f.get_tensor(k) for k in f.keys()}
            cfg = json.loads((d / "adapter_config.json").read_text())
            if cfg.get("use_dora") or cfg.get("peft_type", "LORA") != "LORA":
                raise ValueError(f"{d}: only plain LoRA adapters are supported (got peft_type "
                                 f"{cfg.get('peft_type')!r}, use_dora={cfg.get('use_dora')})")
            r, alpha = cfg.get("r"), cfg.get("lora_alpha")
            if cfg.get("use_rslora"):
                alpha = alpha * math.sqrt(r) if alpha is not None and r else alpha
        else:
            raise FileNotFoundError(f"{d} holds no LoRA: expected {LORA_WEIGHT_NAME} (diffusers) or "
                                    f"{PEFT_WEIGHT_NAME} + adapter_config.json (peft)")
        foreign = sorted({k.split(".", 1)[0] for k in raw if not k.startswith(prefix)})
        if foreign:
            raise ValueError(f"{d} does not match this {self.arch} model: it adapts {foreign}, this model's backbone "
                             f"is {self.backbone_name!r}")
        pairs: dict[str, dict[str, Tensor]] = {}
        for k, v in raw.items():
            m = re.match(rf"{re.escape(prefix)}(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", k)
            if m is None:
                raise ValueError(f"{d}: unexpected LoRA key {k!r}")
            pairs.setdefault(m.group(1), {})[m.group(2)] = v
        modules = dict(self.backbone.named_modules())
        problems = []
        out = {}
        for name, ab in sorted(pairs.items()):
            mod = modules.get(name)
            if "A" not in ab or "B" not in ab:
                problems.append(f"{name}: needs both lora_A and lora_B")
            elif not isinstance(mod, nn.Linear):
                problems.append(f"{name}: no such nn.Linear in the {self.backbone_name}")
            elif ab["A"].shape[1] != mod.in_features or ab["B"].shape[0] != mod.out_features \
                    or ab["A"].shape[0] != ab["B"].shape[1]:
                problems.append(f"{name}: LoRA {tuple(ab['B'].shape)} x {tuple(ab['A'].shape)} does not fit a "
                                f"{mod.out_features}x{mod.in_features} layer")
            else:
                out[name] = (ab["A"], ab["B"])
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"{d} does not match this {self.arch} model: " + "; ".join(problems[:5]) + more)
        if not out:
            raise ValueError(f"{d}: the LoRA file is empty")
        rank = next(iter(out.values()))[0].shape[0]
        r = r or rank
        scaling = float(alpha if alpha is not None else r) / float(r)
        return out, scaling

    @torch.no_grad()
    def load_lora(self, directory: str | os.PathLike, scale: float = 1.0) -> None:
        """Merge a LoRA (diffusers or peft layout) into the backbone weights: ``W += scale * s * B A``."""
        pairs, s = self.read_lora(directory)
        modules = dict(self.backbone.named_modules())
        for name, (A, B) in pairs.items():
            w = modules[name].weight
            w += (scale * s * (B.to(w.device, torch.float32) @ A.to(w.device, torch.float32))).to(w.dtype)


def convert_peft_lora(peft_dir: str | os.PathLike, model: Any,
                      out_dir: str | os.PathLike | None = None) -> Path:
    """Re-write a peft LoRA directory (``final/lora`` of a diffalign run) in diffusers' format, for
    ``pipe.load_lora_weights``. ``model`` is the base model or its pipeline directory."""
    from .diffusers_adapter import DiffusersDenoiser

    if not isinstance(model, DiffusersDenoiser):
        model = DiffusersDenoiser.from_pretrained(model)
    d = Path(peft_dir)
    if not (d / PEFT_WEIGHT_NAME).is_file():
        raise FileNotFoundError(f"{d} is not a peft LoRA directory: {PEFT_WEIGHT_NAME} is missing")
    pairs, scaling = model.read_lora(d)
    state = {}
    for name, (A, B) in pairs.items():
        state[f"{name}.lora_A.weight"] = A.float().contiguous()
        state[f"{name}.lora_B.weight"] = B.float().contiguous()
    r = next(iter(pairs.values()))[0].shape[0]
    return model._write_lora(out_dir or d, state, r, scaling * r)


def _link_or_copy(src, dst) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return str(dst)
