"""GenEval as a reward (Ghosh et al. 2023, "GenEval"; the partial credit of Liu et al. 2025,
"Flow-GRPO"): transformers' Mask2Former (COCO instance segmentation) finds the objects, CLIP
names their colours zero-shot, and the rules of ``geneval_rules`` score the image against the
prompt's metadata. Both models load from local directories; nothing is downloaded.

``rewards.get("geneval", path=DIR)`` with ``DIR/mask2former/`` a transformers Mask2Former COCO
instance checkpoint (``facebook/mask2former-swin-small-coco-instance``: the Swin-S Mask2Former
that GenEval runs through mmdetection, here the original authors' weights) and ``DIR/clip/`` a
transformers CLIP (``openai/clip-vit-large-patch14``, GenEval's ViT-L/14); or ``detector_path=``
and ``clip_path=``. ``mode``: ``partial`` (Flow-GRPO's training reward, default), ``strict``
(Flow-GRPO's exact-count accuracy) or ``correct`` (GenEval's benchmark verdict).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_choice, check_range
from .base import Reward, require
from .clip_common import DTYPES, HF_CLIP_FILES, ClipReward, as_dir, embedding, has_weights, image_settings, load_clip, \
    load_hf, preprocess
from .geneval_rules import COLORS, COUNTING_THRESHOLD, THRESHOLD, Detection, MetadataIndex, Verdict, judge

M2F_FILES = "config.json + model.safetensors of a transformers Mask2FormerForUniversalSegmentation (80 COCO classes)"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY = 0x99 / 255  # GenEval pastes the object's mask onto #999999 before classifying its colour
COLOR_TEMPLATES = ("a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object")


class Mask2FormerDetector:
    """Mask2Former (Cheng et al. 2022, "Masked-attention Mask Transformer for Universal Image
    Segmentation") instance inference: scores ``p(class | query) x mask score`` over the top
    ``top_k`` (query, class) pairs, the mask score being the mean sigmoid inside the binarised
    mask (logit > 0), the box that mask's extent -- the rule of the paper and of mmdetection's
    ``MaskFormerFusionHead`` that GenEval uses.

    Preprocessing from ``preprocessor_config.json`` when present (shortest / longest edge,
    mean, std, ``size_divisor``), else mmdetection's COCO test setting: shorter side 800, longer
    at most 1333, ImageNet mean/std, padding to a multiple of 32.
    """

    def __init__(self, path: Any, class_names: Sequence[str], device: str = "cpu", dtype: str = "float32",
                 top_k: int = 100):
        transformers = require("transformers", "the geneval reward")
        directory = as_dir(path, "geneval detector", M2F_FILES)
        if not (directory / "config.json").is_file() or not has_weights(directory):
            raise FileNotFoundError(f"geneval detector: {str(directory)!r} is not a Mask2Former directory; "
                                    f"expected {M2F_FILES}")
        model = load_hf(transformers.Mask2FormerForUniversalSegmentation, directory, "geneval detector", M2F_FILES)
        n = int(model.config.num_labels)
        if n != len(class_names):
            raise ValueError(f"geneval detector: {str(directory)!r} predicts {n} classes; GenEval needs a COCO "
                             f"instance model with {len(class_names)} (e.g. facebook/mask2former-swin-small-coco-instance)")
        check_choice("dtype", dtype, DTYPES)
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=DTYPES[dtype])
        self.class_names, self.top_k = list(class_names), int(top_k)
        self.short, self.long, self.mean, self.std, self.divisor = 800, 1333, IMAGENET_MEAN, IMAGENET_STD, 32
        cfg_file = directory / "preprocessor_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            size = cfg.get("size") or {}
            size = {"shortest_edge": size} if isinstance(size, int) else size
            self.short = int(size.get("shortest_edge", size.get("height", self.short)))
            self.long = int(size.get("longest_edge", size.get("width", self.long)))
            self.mean, self.std = tuple(cfg.get("image_mean", self.mean)), tuple(cfg.get("image_std", self.std))
            self.divisor = int(cfg.get("size_divisor", cfg.get("size_divisibility", self.divisor)) or 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        h, w = images.shape[-2:]
        scale = min(self.short / min(h, w), self.long / max(h, w))
        nh, nw = round(h * scale), round(w * scale)
        x = F.interpolate(images.float(), size=(nh, nw), mode="bilinear", align_corners=False) if (nh, nw) != (h, w) \
            else images.float()
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - m) / s
        ph, pw = -nh % self.divisor, -nw % self.divisor
        mask = torch.ones(x.shape[0], nh, nw, dtype=torch.long, device=x.device)
        return F.pad(x, [0, pw, 0, ph]), F.pad(mask, [0, pw, 0, ph]), (nh, nw)

    @torch.no_grad()
    def __call__(self, images: Tensor, min_score: float = 0.0) -> list[dict[str, list[Detection]]]:
        """Detections ``{class: [Detection]}`` (most confident first, boolean masks at image size)
        of each ``[3, H, W]`` image in ``[0, 1]``, keeping those scoring above ``min_score``."""
        h, w = images.shape[-2:]
        x, pixel_mask, (nh, nw) = self._inputs(images.to(self.device))
        out = self.model(pixel_values=x.to(self.model.dtype), pixel_mask=pixel_mask)
        probs = out.class_queries_logits.float().softmax(-1)[..., :-1]  # [B, Q, C], the last class is "no object"
        results = []
        for b in range(images.shape[0]):
            c = probs.shape[-1]
            top, idx = probs[b].flatten().topk(min(self.top_k, probs[b].numel()))
            keep = top > min_score  # the mask score is <= 1, so these are the only candidates
            top, idx = top[keep], idx[keep]
            dets: dict[str, list[Detection]] = {}
            if len(idx):
                logits = out.masks_queries_logits[b, idx // c].float()[None]
                logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
                logits = F.interpolate(logits[..., :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)[0]
                binary = logits > 0
                area = binary.flatten(1).sum(1)
                mask_score = (logits.sigmoid() * binary).flatten(1).sum(1) / (area + 1e-6)
                scores = top * mask_score
                for k in torch.argsort(scores, descending=True).tolist():
                    if scores[k] <= min_score:
                        break
                    dets.setdefault(self.class_names[int(idx[k] % c)], []).append(
                        Detection(_mask_box(binary[k]), float(scores[k]), binary[k].cpu().numpy()))
            results.append(dets)
        return results


def _mask_box(mask: Tensor) -> tuple[float, float, float, float]:
    """``(x1, y1, x2 + 1, y2 + 1)`` of a boolean mask's pixels (zeros for an empty mask)."""
    cols, rows = torch.nonzero(mask.any(0)).flatten(), torch.nonzero(mask.any(1)).flatten()
    if len(cols) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


class ClipColors(ClipReward):
    """GenEval's colour classifier: each object's mask pasted on grey, cropped to its box, and
    classified zero-shot by CLIP among the ten ``COLORS`` with the three ``COLOR_TEMPLATES`` per
    class (text embeddings normalised, averaged over templates, normalised again)."""

    name = "geneval_colors"

    def __init__(self, path: Any, device: str = "cpu", dtype: str = "float32"):
        directory = as_dir(path, "geneval colour classifier", HF_CLIP_FILES)
        model, tok = load_clip(directory, "geneval colour classifier")
        self._setup(model, tok, device, dtype, *image_settings(directory, model.config.vision_config.image_size))
        self._classifiers: dict[str, Tensor] = {}

    def to(self, device: str | torch.device) -> "ClipColors":
        self._classifiers.clear()
        return super().to(device)

    def classifier(self, name: str) -> Tensor:
        if name not in self._classifiers:
            per_template = [self.encode_text([t.format(c=c, name=name) for c in COLORS]) for t in COLOR_TEMPLATES]
            self._classifiers[name] = F.normalize(torch.stack(per_template).mean(0), dim=-1)
        return self._classifiers[name]

    @torch.no_grad()
    def __call__(self, image: Tensor, dets: Sequence[Detection], name: str) -> list[str]:
        if not dets:
            return []
        h, w = image.shape[-2:]
        crops = []
        for d in dets:
            x = image if d.mask is None else torch.where(torch.as_tensor(d.mask, device=image.device), image,
                                                         torch.full_like(image, GREY))
            x1, y1, x2, y2 = (int(round(v)) for v in d.box[:4])  # PIL's crop rounds the box
            x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
            crop = x[:, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
            crops.append(preprocess(crop[None].float().to(self.device), self.size, self.mean, self.std))
        feats = F.normalize(embedding(self.model.get_image_features(
            pixel_values=torch.cat(crops).to(self.model.dtype))).float(), dim=-1)
        return [COLORS[i] for i in (feats @ self.classifier(name).T).argmax(-1).tolist()]


class GenEvalReward(Reward):
    """GenEval's verdict on ``[B, 3, H, W]`` images of GenEval prompts (see the module docstring).

    ``metadata``: shipped sets and/or JSONL files holding each prompt's GenEval metadata (default:
    GenEval's 553 prompts); a prompt without metadata is a ``ValueError``. With ``meta``, every
    image's verdict goes to ``meta[i]["geneval"]`` (``correct``, ``strict``, ``score``,
    ``reasons``, ``tag``, ``counts``). ``batch_size`` images per detector forward pass.
    """

    differentiable = False
    MODES = ("partial", "strict", "correct")

    def __init__(self, path: Any = None, mode: str = "partial", metadata: Sequence[str] | str = ("geneval/benchmark",),
                 device: str = "cpu", dtype: str = "float32", detector_path: Any = None, clip_path: Any = None,
                 batch_size: int = 16):
        from ..data import prompt_sets

        check_choice("mode", mode, self.MODES)
        self.mode, self.name = mode, "geneval" if mode == "partial" else f"geneval_{mode}"
        self.batch_size = check_range("batch_size", batch_size, 1, None, integer=True)
        self.index = MetadataIndex([metadata] if isinstance(metadata, str) else list(metadata))
        expected = f"mask2former/ ({M2F_FILES}) and clip/ ({HF_CLIP_FILES})"
        if detector_path is None or clip_path is None:
            root = as_dir(path, "geneval", expected)
            detector_path = detector_path if detector_path is not None else root / "mask2former"
            clip_path = clip_path if clip_path is not None else root / "clip"
        self.detector = Mask2FormerDetector(Path(detector_path), prompt_sets.geneval_object_names(), device, dtype)
        self.colors = ClipColors(Path(clip_path), device, dtype)

    def to(self, device: str | torch.device) -> "GenEvalReward":
        self.detector.model.to(device)
        self.colors.to(device)
        return self

    def verdicts(self, images: Tensor, prompts: list[str]) -> list[Verdict]:
        """The rules' verdict on each image (metadata looked up first, so a bad prompt fails fast)."""
        metas = [self.index[p] for p in prompts]
        out: list[Verdict] = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = images[i:i + self.batch_size]
            dets = self.detector(chunk, min_score=min(THRESHOLD, COUNTING_THRESHOLD))
            for j, (d, m) in enumerate(zip(dets, metas[i:i + self.batch_size])):
                image = chunk[j].detach().float().to(self.colors.device)
                out.append(judge(d, m, lambda found, name, image=image: self.colors(image, found, name)))
        return out

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        verdicts = self.verdicts(images, prompts)
        if meta is not None:
            for m, p, v in zip(meta, prompts, verdicts):
                m["geneval"] = {"correct": v.correct, "strict": v.strict, "score": v.score, "reasons": v.reasons,
                                "tag": self.index[p]["tag"], "counts": v.counts}
        key = {"partial": lambda v: v.score, "strict": lambda v: float(v.strict), "correct": lambda v: float(v.correct)}
        return torch.tensor(np.array([key[self.mode](v) for v in verdicts], dtype=np.float32))
