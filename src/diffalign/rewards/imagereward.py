"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"): a BLIP ViT-L/16 image encoder, a BERT text encoder that
cross-attends to the image tokens, and an MLP on the ``[CLS]`` output, standardised with the
published mean 0.16717362830052426 and std 1.0333394966054072.

**Why not the ``image-reward`` package.** It pins ``timm==0.6.13`` and ``fairscale``, and needs
``diffusers``/``datasets`` and torchvision (which does not load beside the pinned torch), and
it downloads ``bert-base-uncased`` at construction. diffalign instead loads the published
checkpoint into transformers' BLIP classes (``BlipVisionModel`` + ``BlipTextModel`` with
cross-attention), whose module structure mirrors BLIP's ``vit.py`` / ``med.py``:

========================================================  =========================================================
ImageReward.pt                                            diffalign module (transformers class)
========================================================  =========================================================
``blip.visual_encoder.cls_token`` / ``pos_embed``         ``vision_model.embeddings.class_embedding`` / ``position_embedding``
``blip.visual_encoder.patch_embed.proj``                  ``vision_model.embeddings.patch_embedding``
``blip.visual_encoder.blocks.i.norm1`` / ``norm2``        ``vision_model.encoder.layers.i.layer_norm1`` / ``layer_norm2``
``blip.visual_encoder.blocks.i.attn.qkv`` / ``attn.proj`` ``vision_model.encoder.layers.i.self_attn.qkv`` / ``projection``
``blip.visual_encoder.blocks.i.mlp.fc1`` / ``fc2``        ``vision_model.encoder.layers.i.mlp.fc1`` / ``fc2``
``blip.visual_encoder.norm``                              ``vision_model.post_layernorm``
``blip.text_encoder.<rest>``                              ``text_model.<rest>`` (same names as BLIP's ``med.py``)
``mlp.layers.{0,2,4,6,7}``                                ``head.layers.{0,2,4,6,7}``
========================================================  =========================================================

``blip.vision_proj`` / ``blip.text_proj`` (ITC projections) and ``position_ids`` buffers are
unused and ignored. The ViT uses LayerNorm eps 1e-6, exact GELU and 64-dim heads (BLIP's base
and large ViTs both do). As in ``ImageReward.score``, the prompt is tokenised with padding to
35 tokens and ``[CLS]`` first (the ``[ENC]`` token is *not* substituted).

Layout of ``path=DIR``: ``ImageReward.pt``, ``med_config.json`` (both from THUDM/ImageReward) and
the ``bert-base-uncased`` tokenizer (``vocab.txt``, in ``DIR`` or ``DIR/tokenizer/``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import check_choice
from .base import Reward, require
from .clip_common import CLIP_MEAN, CLIP_STD, DTYPES, as_dir, find_file, load_hf, load_torch_file, preprocess, \
    skip_init
from .clip_models import AestheticHead

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
EXPECTED = "ImageReward.pt, med_config.json and the bert-base-uncased tokenizer (vocab.txt, in DIR or DIR/tokenizer/)"
_VIT = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK = re.compile(r"^blip\.visual_encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)$")


def imagereward_to_diffalign(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map ``ImageReward.pt`` keys to the :class:`ImageRewardModel` keys (see the module docstring)."""
    out: dict[str, Tensor] = {}
    top = {"blip.visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
           "blip.visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
           "blip.visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
           "blip.visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
           "blip.visual_encoder.norm.weight": "vision_model.post_layernorm.weight",
           "blip.visual_encoder.norm.bias": "vision_model.post_layernorm.bias"}
    for key, val in state.items():
        if key in top:
            out[top[key]] = val
        elif (m := _BLOCK.match(key)) and m.group(2) in _VIT:
            out[f"vision_model.encoder.layers.{m.group(1)}.{_VIT[m.group(2)]}.{m.group(3)}"] = val
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            out["text_model." + key[len("blip.text_encoder."):]] = val
        elif key.startswith("mlp.layers."):
            out["head." + key[len("mlp."):]] = val
    return out


class ImageRewardModel(nn.Module):
    """BLIP vision tower + cross-attending text encoder + MLP head, built from the checkpoint's shapes."""

    def __init__(self, state: dict[str, Tensor], med_config: dict, what: str = "imagereward",
                 token_ids: dict[str, int] | None = None):
        super().__init__()
        tf = require("transformers", what)
        need = ["blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed",
                "blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.blocks.0.mlp.fc1.weight"]
        missing = [k for k in need if k not in state]
        if missing:
            raise ValueError(f"{what}: not an ImageReward checkpoint; missing keys {missing}")
        width = int(state["blip.visual_encoder.cls_token"].shape[-1])
        patch = int(state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1])
        grid = int(round((state["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5))
        depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
        vcfg = tf.BlipVisionConfig(hidden_size=width, intermediate_size=int(state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]),
                                   num_hidden_layers=depth, num_attention_heads=max(1, width // 64),
                                   image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6)
        m = med_config
        tcfg = tf.BlipTextConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], encoder_hidden_size=width,
                                 intermediate_size=m["intermediate_size"], num_hidden_layers=m["num_hidden_layers"],
                                 num_attention_heads=m["num_attention_heads"],
                                 max_position_embeddings=m["max_position_embeddings"], hidden_act=m.get("hidden_act", "gelu"),
                                 layer_norm_eps=m.get("layer_norm_eps", 1e-12), hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, pad_token_id=m.get("pad_token_id", 0),
                                 is_decoder=True, use_cache=False,  # is_decoder: build the cross-attention layers
                                 **(token_ids or {}))
        with skip_init():  # every weight is loaded below (missing keys are an error)
            self.vision_model = tf.BlipVisionModel(vcfg)
            self.text_model = tf.BlipTextModel(tcfg, add_pooling_layer=False)
        mapped = imagereward_to_diffalign(state)
        head_state = {k[len("head."):]: v for k, v in mapped.items() if k.startswith("head.")}
        self.head = AestheticHead.from_state_dict(head_state, f"{what} head (mlp.layers.*)")
        body = {k: v for k, v in mapped.items() if not k.startswith("head.")}
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()
                    if not k.startswith("head.") and not k.endswith("position_ids")}
        lacking = sorted(set(expected) - set(body))
        wrong = [f"{k}: {tuple(v.shape)} vs {expected[k]}" for k, v in body.items()
                 if k in expected and tuple(v.shape) != expected[k]]
        if lacking or wrong:
            raise ValueError(f"{what}: checkpoint does not match med_config.json / the BLIP ViT "
                             f"(missing {lacking[:6]}, shape mismatches {wrong[:4]})")
        self.load_state_dict(body, strict=False)
        self.image_size = grid * patch

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                              encoder_attention_mask=image_atts)
        return (self.head(out.last_hidden_state[:, 0, :].float()).squeeze(-1) - MEAN) / STD


class ImageReward(Reward):
    """ImageReward score (standardised; about -2..2, higher is better). Differentiable in the images.
    See the module docstring for the checkpoint layout and how it is loaded."""

    name = "imagereward"
    differentiable = True

    def __init__(self, path: Any = None, device: str = "cpu", dtype: str = "float32", tokenizer_path: Any = None):
        tf = require("transformers", self.name)
        directory = as_dir(path, self.name, EXPECTED)
        ckpt = find_file(directory, ["ImageReward.pt", "ImageReward.safetensors"], self.name, EXPECTED)
        cfg_file = find_file(directory, ["med_config.json"], self.name, EXPECTED)
        tok_dirs = [Path(tokenizer_path)] if tokenizer_path is not None else [directory, directory / "tokenizer"]
        tok_dir = next((d for d in tok_dirs if (d / "vocab.txt").is_file() or (d / "tokenizer.json").is_file()), None)
        if tok_dir is None:
            raise FileNotFoundError(f"imagereward: no BERT tokenizer (vocab.txt) in {[str(d) for d in tok_dirs]}; "
                                    f"expected {EXPECTED}")
        tok = load_hf(tf.BertTokenizer, tok_dir, self.name, EXPECTED)
        tok.add_special_tokens({"bos_token": "[DEC]"})  # as BLIP's init_tokenizer (ids 30522, 30523)
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        try:
            med = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise ValueError(f"imagereward: {str(cfg_file)!r} is not valid JSON: {e}") from e
        if len(tok) > med.get("vocab_size", 0):
            raise ValueError(f"imagereward: tokenizer in {str(tok_dir)!r} has {len(tok)} tokens but med_config.json "
                             f"vocab_size is {med.get('vocab_size')}")
        check_choice("dtype", dtype, DTYPES)
        ids = {"bos_token_id": tok.bos_token_id, "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id}
        self.model = ImageRewardModel(load_torch_file(ckpt, self.name), med, self.name, ids)
        self.model.eval().requires_grad_(False).to(device=device, dtype=DTYPES[dtype])
        self.model.head.float()  # the head runs in float32, as in ImageReward (txt_features.float())
        self.tokenizer = tok

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "ImageReward":
        self.model.to(device)
        return self

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        x = preprocess(images.to(self.device), self.model.image_size, CLIP_MEAN, CLIP_STD, "crop")
        dtype = next(self.model.parameters()).dtype
        return self.model(x.to(dtype), tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)).float()
