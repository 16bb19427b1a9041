"""HPSv2 / HPSv2.1 (Wu et al. 2023, "Human Preference Score v2: A Solid Benchmark for Evaluating
Human Preferences of Text-to-Image Synthesis"): an open_clip ViT-H/14 fine-tuned on HPD v2;
the score is the cosine of the normalised image and text embeddings (about 0.2..0.35).

**Why no open_clip.** ``open_clip_torch`` imports torchvision at package import, and PyPI's
torchvision does not load beside the pinned torch (its C++ ops fail to register), so
diffalign loads the published open_clip state dict into transformers' ``CLIPModel``, which
is the same architecture. :func:`openclip_to_hf` maps the keys:

==========================================  ==========================================================
open_clip                                   transformers CLIPModel
==========================================  ==========================================================
``visual.conv1.weight``                     ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding``                  ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``             ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre`` / ``visual.ln_post``      ``vision_model.pre_layrnorm`` / ``vision_model.post_layernorm``
``visual.proj`` (``[width, dim]``)          ``visual_projection.weight`` (transposed)
``[visual.]transformer.resblocks.i.``       ``{vision,text}_model.encoder.layers.i.``
``  ln_1`` / ``ln_2``                       ``  layer_norm1`` / ``layer_norm2``
``  attn.in_proj_{weight,bias}``            ``  self_attn.{q,k,v}_proj.{weight,bias}`` (split in 3)
``  attn.out_proj``                         ``  self_attn.out_proj``
``  mlp.c_fc`` / ``mlp.c_proj``             ``  mlp.fc1`` / ``mlp.fc2``
``token_embedding.weight``                  ``text_model.embeddings.token_embedding.weight``
``positional_embedding``                    ``text_model.embeddings.position_embedding.weight``
``ln_final``                                ``text_model.final_layer_norm``
``text_projection`` (``[width, dim]``)      ``text_projection.weight`` (transposed)
``logit_scale``                             ``logit_scale``
==========================================  ==========================================================

Both towers use exact GELU (ViT-H-14 has no ``quick_gelu``), LayerNorm eps 1e-5, a causal text
mask and EOT pooling (open_clip takes the argmax token id, which is the EOT token 49407;
transformers takes the first ``eos_token_id``, set to the same token). Image preprocessing
follows HPS's ``preprocess_val`` (``ResizeMaxSize``: longer side to 224, bicubic, black
padding; OpenAI mean/std). The mapping is checked in ``tests/test_rewards_models.py`` against
an independent re-implementation of open_clip's forward pass.

Layout of ``path=DIR``: ``HPS_v2.1_compressed.pt`` or ``HPS_v2_compressed.pt`` (the published
checkpoints, ``{"state_dict": ...}``; or ``checkpoint=FILE``), the CLIP BPE tokenizer files
(``vocab.json`` + ``merges.txt`` or ``tokenizer.json``, e.g. from
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; or ``tokenizer_path=``), and optionally
``open_clip_config.json`` (open_clip's model config; default: ViT-H-14's).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from .base import require
from .clip_common import CLIP_MEAN, CLIP_STD, ClipReward, as_dir, find_file, load_tokenizer, load_torch_file, \
    skip_init

CHECKPOINTS = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt", "HPS_v2.1.pt", "HPS_v2.pt")
VIT_H_14 = {"embed_dim": 1024,
            "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}}
EXPECTED = (f"one of {list(CHECKPOINTS)} (open_clip ViT-H-14 state dict), CLIP tokenizer files (vocab.json + "
            f"merges.txt or tokenizer.json) and optionally open_clip_config.json")


def hf_clip_config(oc: dict, eos_token_id: int, bos_token_id: int, pad_token_id: int) -> dict:
    """transformers ``CLIPConfig`` kwargs equivalent to an open_clip model config dict."""
    v, t = oc["vision_cfg"], oc["text_cfg"]
    act = "quick_gelu" if oc.get("quick_gelu") else "gelu"
    mlp = float(v.get("mlp_ratio", 4.0)), float(t.get("mlp_ratio", 4.0))
    return {
        "projection_dim": oc["embed_dim"],
        "vision_config": {"hidden_size": v["width"], "intermediate_size": int(v["width"] * mlp[0]),
                          "num_hidden_layers": v["layers"], "num_attention_heads": v["width"] // v.get("head_width", 64),
                          "image_size": v["image_size"], "patch_size": v["patch_size"], "hidden_act": act,
                          "projection_dim": oc["embed_dim"], "layer_norm_eps": 1e-5},
        "text_config": {"vocab_size": t.get("vocab_size", 49408), "hidden_size": t["width"],
                        "intermediate_size": int(t["width"] * mlp[1]), "num_hidden_layers": t["layers"],
                        "num_attention_heads": t["heads"], "max_position_embeddings": t.get("context_length", 77),
                        "hidden_act": act, "projection_dim": oc["embed_dim"], "layer_norm_eps": 1e-5,
                        "eos_token_id": eos_token_id, "bos_token_id": bos_token_id, "pad_token_id": pad_token_id},
    }


_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale"}
_IGNORED = re.compile(r"^(attn_mask|visual\.attn_mask|logit_bias)$")
_RES = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|in_proj_bias)$")


def openclip_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an open_clip ViT state dict (HPS checkpoint layout) to transformers ``CLIPModel`` keys.

    Raises ``ValueError`` listing keys it does not know (e.g. a ConvNeXt or custom-text model).
    """
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    unknown = []
    for key, val in state.items():
        if key in _TOP:
            out[_TOP[key]] = val
        elif key == "visual.proj":
            out["visual_projection.weight"] = val.T.contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = val.T.contiguous()
        elif m := _RES.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}."
            if m.group(3) == "attn" and m.group(4).startswith("in_proj_"):
                kind = m.group(4)[len("in_proj_"):]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), val.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
            elif m.group(3) in _BLOCK:
                out[f"{prefix}{_BLOCK[m.group(3)]}.{m.group(4)}"] = val
            else:
                unknown.append(key)
        elif not _IGNORED.match(key):
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected open_clip keys (not a plain ViT CLIP such as ViT-H-14): {unknown[:10]}")
    return out


def load_openclip_as_hf(checkpoint: Path, config: dict, tokenizer: Any, what: str) -> Any:
    """Build a transformers ``CLIPModel`` from ``config`` and load an open_clip checkpoint into it."""
    transformers = require("transformers", what)
    raw = load_torch_file(checkpoint, what)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{what}: {str(checkpoint)!r} holds no state dict (expected a dict with 'state_dict')")
    hf_state = openclip_to_hf(state)
    cfg = transformers.CLIPConfig(**hf_clip_config(config, tokenizer.eos_token_id, tokenizer.bos_token_id,
                                                   tokenizer.pad_token_id))
    with skip_init():  # every weight is loaded below (missing keys are an error)
        model = transformers.CLIPModel(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(hf_state))
    wrong = [f"{k}: {tuple(v.shape)} vs {expected[k]}" for k, v in hf_state.items()
             if k in expected and tuple(v.shape) != expected[k]]
    if missing or wrong:
        raise ValueError(f"{what}: {str(checkpoint)!r} does not match the open_clip config {config} "
                         f"(missing {missing[:6]}, shape mismatches {wrong[:4]}); pass the right open_clip_config.json")
    model.load_state_dict(hf_state, strict=False)
    return model


class HPSv2(ClipReward):
    """HPSv2 / HPSv2.1 score: ``cos(E_img, E_txt)`` of the HPS-fine-tuned open_clip ViT-H/14.
    See the module docstring for the checkpoint layout and the open_clip key mapping."""

    name = "hpsv2"
    preprocess_mode = "pad"

    def __init__(self, path: Any = None, checkpoint: Any = None, device: str = "cpu", dtype: str = "float32",
                 tokenizer_path: Any = None):
        directory = as_dir(path, self.name, EXPECTED)
        ckpt = Path(checkpoint) if checkpoint is not None else find_file(directory, CHECKPOINTS, self.name, EXPECTED)
        if not ckpt.is_file():
            raise FileNotFoundError(f"hpsv2: checkpoint {str(ckpt)!r} does not exist; expected {EXPECTED}")
        cfg_file = directory / "open_clip_config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else VIT_H_14
        config = config.get("model_cfg", config)  # open_clip_config.json nests it under "model_cfg"
        tokenizer = load_tokenizer(Path(tokenizer_path) if tokenizer_path is not None else directory, self.name)
        model = load_openclip_as_hf(ckpt, config, tokenizer, self.name)
        self._setup(model, tokenizer, device, dtype, config["vision_cfg"]["image_size"], CLIP_MEAN, CLIP_STD)

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        return self.cosine(images, prompts)


__all__ = ["HPSv2", "openclip_to_hf", "hf_clip_config", "load_openclip_as_hf"]
