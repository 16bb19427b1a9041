"""Tiny random reward-model checkpoints in the *published* layouts, for tests and benchmarks.

Each ``save_tiny_*`` writes a directory that the real loader reads exactly as it reads the
published checkpoint (same file names, same state-dict keys and formats), only with tiny sizes
and random weights: ``rewards.get("clipscore", path=save_tiny_clip(tmp))``. Nothing is downloaded.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from ..worlds import shapes as world

_CHARS = list(string.ascii_lowercase) + list("0123456789.,!?'-")


def save_clip_tokenizer(directory: str | Path) -> Path:
    """A character-level CLIP BPE tokenizer (``vocab.json`` + ``merges.txt``); EOT has the largest id,
    as in CLIP (open_clip pools at the argmax token id)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tokens = _CHARS + [c + "</w>" for c in _CHARS] + ["<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return d


def _clip_vocab_size() -> int:
    return 2 * len(_CHARS) + 2


def save_tiny_clip(directory: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                   hidden: int = 32, layers: int = 2, heads: int = 2, projection_dim: int = 16) -> Path:
    """A random transformers CLIP in ``save_pretrained`` layout (the clipscore / pickscore layout)."""
    import transformers

    from .clip_common import quiet_transformers

    d = save_clip_tokenizer(directory)
    v = _clip_vocab_size()
    common = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "projection_dim": projection_dim}
    cfg = transformers.CLIPConfig(
        text_config={**common, "vocab_size": v, "max_position_embeddings": 77, "eos_token_id": v - 1,
                     "bos_token_id": v - 2, "pad_token_id": v - 1},
        vision_config={**common, "image_size": image_size, "patch_size": patch_size}, projection_dim=projection_dim)
    torch.manual_seed(seed)
    with quiet_transformers():
        transformers.CLIPModel(cfg).save_pretrained(str(d))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": image_size, "width": image_size}, "size": {"shortest_edge": image_size},
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return d


def save_tiny_aesthetic(directory: str | Path, seed: int = 0) -> Path:
    """``DIR/sac+logos+ava1-l14-linearMSE.pth`` (the published head's layer sizes, on a 16-dim input)
    beside a tiny CLIP in ``DIR/clip-vit-large-patch14/``."""
    from .clip_models import AESTHETIC_HEAD, AestheticHead

    d = Path(directory)
    save_tiny_clip(d / "clip-vit-large-patch14", seed=seed)
    torch.manual_seed(seed + 1)
    torch.save(AestheticHead([16, 1024, 128, 64, 16, 1]).state_dict(), d / AESTHETIC_HEAD)
    return d


def _rand(shape: tuple[int, ...], g: torch.Generator, std: float = 0.05) -> torch.Tensor:
    return torch.randn(shape, generator=g) * std


def _ln(prefix: str, width: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1 + _rand((width,), g, 0.1), f"{prefix}.bias": _rand((width,), g, 0.1)}


def tiny_openclip_config(image_size: int = 32, patch_size: int = 8) -> dict:
    """An open_clip model config (``open_clip_config.json`` ``model_cfg``) for a tiny ViT CLIP."""
    return {"embed_dim": 16,
            "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "head_width": 16, "patch_size": patch_size},
            "text_cfg": {"context_length": 77, "vocab_size": _clip_vocab_size(), "width": 32, "heads": 2, "layers": 2}}


def tiny_openclip_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with open_clip's ``CLIP`` keys and shapes (what HPS checkpoints hold)."""
    g = torch.Generator().manual_seed(seed)
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    s: dict[str, torch.Tensor] = {}

    def blocks(prefix: str, width: int, n: int) -> None:
        for i in range(n):
            p = f"{prefix}transformer.resblocks.{i}"
            s.update(_ln(f"{p}.ln_1", width, g) | _ln(f"{p}.ln_2", width, g))
            s[f"{p}.attn.in_proj_weight"] = _rand((3 * width, width), g, width**-0.5)
            s[f"{p}.attn.in_proj_bias"] = _rand((3 * width,), g)
            s[f"{p}.attn.out_proj.weight"] = _rand((width, width), g, width**-0.5)
            s[f"{p}.attn.out_proj.bias"] = _rand((width,), g)
            s[f"{p}.mlp.c_fc.weight"] = _rand((4 * width, width), g, width**-0.5)
            s[f"{p}.mlp.c_fc.bias"] = _rand((4 * width,), g)
            s[f"{p}.mlp.c_proj.weight"] = _rand((width, 4 * width), g, (4 * width) ** -0.5)
            s[f"{p}.mlp.c_proj.bias"] = _rand((width,), g)

    vw, grid = v["width"], v["image_size"] // v["patch_size"]
    s["visual.class_embedding"] = _rand((vw,), g, 0.5)
    s["visual.positional_embedding"] = _rand((grid * grid + 1, vw), g, 0.5)
    s["visual.conv1.weight"] = _rand((vw, 3, v["patch_size"], v["patch_size"]), g, 0.2)
    s.update(_ln("visual.ln_pre", vw, g) | _ln("visual.ln_post", vw, g))
    blocks("visual.", vw, v["layers"])
    s["visual.proj"] = _rand((vw, e), g, vw**-0.5)
    tw = t["width"]
    s["token_embedding.weight"] = _rand((t["vocab_size"], tw), g, 0.5)
    s["positional_embedding"] = _rand((t["context_length"], tw), g, 0.1)
    blocks("", tw, t["layers"])
    s.update(_ln("ln_final", tw, g))
    s["text_projection"] = _rand((tw, e), g, tw**-0.5)
    s["logit_scale"] = torch.tensor(4.6052)
    s["attn_mask"] = torch.full((t["context_length"], t["context_length"]), float("-inf")).triu(1)  # old open_clip
    return s


def save_tiny_hps(directory: str | Path, seed: int = 0) -> Path:
    """``HPS_v2.1_compressed.pt`` (``{"state_dict": open_clip keys}``), ``open_clip_config.json`` and
    the tokenizer files -- the HPSv2 layout with a tiny ViT."""
    d = save_clip_tokenizer(directory)
    cfg = tiny_openclip_config()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.save({"state_dict": tiny_openclip_state(cfg, seed)}, d / "HPS_v2.1_compressed.pt")
    return d


def save_bert_vocab(directory: str | Path) -> int:
    """A tiny uncased WordPiece ``vocab.txt`` (special tokens, letters, ``##letters``, the shapes words)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _CHARS + [f"##{c}" for c in _CHARS] + sorted(world.VOCAB)
    words = list(dict.fromkeys(words))
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "vocab.txt").write_text("\n".join(words) + "\n")
    return len(words)


def save_tiny_imagereward(directory: str | Path, seed: int = 0, image_size: int = 32, patch: int = 8) -> Path:
    """``ImageReward.pt`` (BLIP ``vit.py`` / ``med.py`` keys + ``mlp.layers``), ``med_config.json`` and a
    tiny ``vocab.txt`` -- the ImageReward layout with a 2-layer ViT (width 64) and a 2-layer BERT."""
    d = Path(directory)
    n_vocab = save_bert_vocab(d) + 2  # + [DEC], [ENC]
    g = torch.Generator().manual_seed(seed)
    vw, tw, grid = 64, 32, image_size // patch
    s: dict[str, torch.Tensor] = {"blip.visual_encoder.cls_token": _rand((1, 1, vw), g, 0.5),
                                  "blip.visual_encoder.pos_embed": _rand((1, grid * grid + 1, vw), g, 0.5),
                                  "blip.visual_encoder.patch_embed.proj.weight": _rand((vw, 3, patch, patch), g, 0.2),
                                  "blip.visual_encoder.patch_embed.proj.bias": _rand((vw,), g)}
    for i in range(2):
        p = f"blip.visual_encoder.blocks.{i}"
        s.update(_ln(f"{p}.norm1", vw, g) | _ln(f"{p}.norm2", vw, g))
        for name, (o, n) in {"attn.qkv": (3 * vw, vw), "attn.proj": (vw, vw), "mlp.fc1": (4 * vw, vw),
                             "mlp.fc2": (vw, 4 * vw)}.items():
            s[f"{p}.{name}.weight"], s[f"{p}.{name}.bias"] = _rand((o, n), g, n**-0.5), _rand((o,), g)
    s.update(_ln("blip.visual_encoder.norm", vw, g))
    t = "blip.text_encoder"
    s[f"{t}.embeddings.word_embeddings.weight"] = _rand((n_vocab, tw), g, 0.5)
    s[f"{t}.embeddings.position_embeddings.weight"] = _rand((40, tw), g, 0.1)
    s[f"{t}.embeddings.position_ids"] = torch.arange(40)[None]
    s.update(_ln(f"{t}.embeddings.LayerNorm", tw, g))
    for i in range(2):
        p = f"{t}.encoder.layer.{i}"
        for att, kv in (("attention", tw), ("crossattention", vw)):
            for name, n in (("query", tw), ("key", kv), ("value", kv)):
                s[f"{p}.{att}.self.{name}.weight"], s[f"{p}.{att}.self.{name}.bias"] = _rand((tw, n), g, n**-0.5), _rand((tw,), g)
            s[f"{p}.{att}.output.dense.weight"], s[f"{p}.{att}.output.dense.bias"] = _rand((tw, tw), g, tw**-0.5), _rand((tw,), g)
            s.update(_ln(f"{p}.{att}.output.LayerNorm", tw, g))
        s[f"{p}.intermediate.dense.weight"], s[f"{p}.intermediate.dense.bias"] = _rand((2 * tw, tw), g, tw**-0.5), _rand((2 * tw,), g)
        s[f"{p}.output.dense.weight"], s[f"{p}.output.dense.bias"] = _rand((tw, 2 * tw), g, (2 * tw) ** -0.5), _rand((tw,), g)
        s.update(_ln(f"{p}.output.LayerNorm", tw, g))
    for i, (o, n) in zip((0, 2, 4, 6, 7), ((1024, tw), (128, 1024), (64, 128), (16, 64), (1, 16))):
        s[f"mlp.layers.{i}.weight"], s[f"mlp.layers.{i}.bias"] = _rand((o, n), g, n**-0.5), _rand((o,), g)
    s["blip.vision_proj.weight"], s["blip.vision_proj.bias"] = _rand((16, vw), g), _rand((16,), g)  # unused (ITC)
    torch.save(s, d / "ImageReward.pt")
    (d / "med_config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": tw, "initializer_range": 0.02, "intermediate_size": 2 * tw,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
        "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": n_vocab,
        "encoder_width": vw, "add_cross_attention": True}))
    return d


def save_tiny_mask2former(directory: str | Path, seed: int = 0, size: int = 64) -> Path:
    """A random transformers Mask2Former (tiny Swin backbone, 80 classes named as GenEval's COCO
    classes, 20 queries) in ``save_pretrained`` layout, with a ``preprocessor_config.json`` that
    resizes to ``size``."""
    import transformers

    from ..data.prompt_sets import geneval_object_names
    from .clip_common import quiet_transformers

    d = Path(directory)
    names = geneval_object_names()
    backbone = transformers.SwinConfig(image_size=size, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                       num_heads=[1, 1, 2, 2], window_size=4,
                                       out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.Mask2FormerConfig(
        backbone_config=backbone, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, hidden_dim=32, mask_feature_size=32, feature_size=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=64, encoder_feedforward_dim=64,
        num_queries=20, common_stride=4, use_pretrained_backbone=False)
    torch.manual_seed(seed)
    with quiet_transformers():
        transformers.Mask2FormerForUniversalSegmentation(cfg).save_pretrained(str(d))
    (d / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": size, "longest_edge": size}, "size_divisor": 32,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return d


def save_tiny_geneval(directory: str | Path, seed: int = 0) -> Path:
    """The ``geneval`` reward's layout: ``DIR/mask2former/`` and ``DIR/clip/``, tiny and random."""
    d = Path(directory)
    save_tiny_mask2former(d / "mask2former", seed=seed)
    save_tiny_clip(d / "clip", seed=seed)
    return d
