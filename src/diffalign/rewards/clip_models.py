"""CLIP-based rewards loaded from local directories: CLIPScore, PickScore, LAION aesthetic.

All three use transformers' ``CLIPModel`` (no open_clip, no torchvision), preprocess images
differentiably (:func:`diffalign.rewards.clip_common.preprocess`) and are ``differentiable``.

Expected layouts (``rewards.get(NAME, path=DIR)``; nothing is ever downloaded):

* ``clipscore``: ``DIR`` = a transformers CLIP directory, e.g. ``openai/clip-vit-base-patch32``
  or ``openai/clip-vit-large-patch14`` as saved by ``save_pretrained`` / ``snapshot_download``:
  ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``), tokenizer files
  (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``), optional ``preprocessor_config.json``
  (crop size, mean, std).
* ``pickscore``: ``DIR`` = ``yuvalkirstain/PickScore_v1`` (a CLIP ViT-H/14 in transformers
  format). That repository has no tokenizer; put the tokenizer and ``preprocessor_config.json``
  of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` into ``DIR`` or pass ``tokenizer_path=``.
* ``aesthetic``: ``DIR`` holds the head ``sac+logos+ava1-l14-linearMSE.pth`` (from
  christophschuhmann/improved-aesthetic-predictor) *beside* the CLIP ViT-L/14 directory
  ``DIR/clip-vit-large-patch14/`` (``openai/clip-vit-large-patch14``; ``DIR/clip/`` or ``DIR`` itself
  also work, or pass ``clip_path=`` / ``head_path=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import check_range
from .clip_common import HF_CLIP_FILES, ClipReward, as_dir, find_file, has_weights, image_settings, load_clip, \
    load_torch_file


class CLIPScore(ClipReward):
    """CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
    Captioning"): ``scale * max(cos(E_img, E_txt), 0)``.

    The paper uses ``w = 2.5`` on ViT-B/32; the default ``scale = 100`` follows torchmetrics'
    ``CLIPScore`` (typical values 15..35). ``clamp=False`` returns ``scale * cos`` unclamped, which
    keeps a gradient where the cosine is negative (useful for optimisation on weak models).
    """

    name = "clipscore"

    def __init__(self, path: Any = None, scale: float = 100.0, clamp: bool = True, device: str = "cpu",
                 dtype: str = "float32", tokenizer_path: Any = None):
        directory = as_dir(path, self.name, HF_CLIP_FILES)
        model, tok = load_clip(directory, self.name, tokenizer_path)
        self._setup(model, tok, device, dtype, *image_settings(directory, model.config.vision_config.image_size))
        self.scale = check_range("scale", scale, 0, None, lo_open=True)
        self.clamp = bool(clamp)

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        cos = self.cosine(images, prompts)
        return self.scale * (cos.clamp(min=0) if self.clamp else cos)


class PickScore(ClipReward):
    """PickScore (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for
    Text-to-Image Generation"): ``exp(logit_scale) * cos(E_txt, E_img)``, a CLIP ViT-H/14 fine-tuned
    on Pick-a-Pic preferences (values around 18..23 for good SD images)."""

    name = "pickscore"

    def __init__(self, path: Any = None, device: str = "cpu", dtype: str = "float32", tokenizer_path: Any = None):
        directory = as_dir(path, self.name, HF_CLIP_FILES)
        model, tok = load_clip(directory, self.name, tokenizer_path)
        self._setup(model, tok, device, dtype, *image_settings(directory, model.config.vision_config.image_size))

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)


AESTHETIC_HEAD = "sac+logos+ava1-l14-linearMSE.pth"
_HEAD_LAYERS = (0, 2, 4, 6, 7)  # Linear positions in the published nn.Sequential (dropouts between)


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP: Linear(768,1024), Dropout(0.2), Linear(1024,128),
    Dropout(0.2), Linear(128,64), Dropout(0.1), Linear(64,16), Linear(16,1) -- no activations,
    exactly as published (so state-dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``)."""

    def __init__(self, dims: list[int]):
        super().__init__()
        d = dims
        self.layers = nn.Sequential(nn.Linear(d[0], d[1]), nn.Dropout(0.2), nn.Linear(d[1], d[2]), nn.Dropout(0.2),
                                    nn.Linear(d[2], d[3]), nn.Dropout(0.1), nn.Linear(d[3], d[4]), nn.Linear(d[4], d[5]))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, state: dict, where: str) -> "AestheticHead":
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        want = [f"layers.{i}.{k}" for i in _HEAD_LAYERS for k in ("weight", "bias")]
        missing = [k for k in want if k not in state]
        if missing:
            raise ValueError(f"aesthetic: {where} is not an improved-aesthetic-predictor head; missing keys {missing} "
                             f"(expected {want})")
        dims = [int(state["layers.0.weight"].shape[1])] + [int(state[f"layers.{i}.weight"].shape[0]) for i in _HEAD_LAYERS]
        head = cls(dims)
        try:
            head.load_state_dict({k: state[k] for k in want})
        except RuntimeError as e:
            raise ValueError(f"aesthetic: {where} has inconsistent layer shapes: {e}") from e
        return head


class AestheticScore(ClipReward):
    """LAION aesthetic predictor v2 (Schuhmann et al., LAION-Aesthetics; the
    ``improved-aesthetic-predictor`` "sac+logos+ava1-l14-linearMSE" head used by DDPO): the MLP
    head on the L2-normalised CLIP ViT-L/14 image embedding, predicting a 1..10 rating.
    Prompt-independent."""

    name = "aesthetic"

    def __init__(self, path: Any = None, device: str = "cpu", dtype: str = "float32",
                 clip_path: Any = None, head_path: Any = None):
        expected = f"{AESTHETIC_HEAD} beside a CLIP ViT-L/14 directory clip-vit-large-patch14/ ({HF_CLIP_FILES})"
        # path=DIR is needed unless both files are given explicitly
        directory = None if path is None and clip_path is not None and head_path is not None \
            else as_dir(path, self.name, expected)
        if head_path is not None:
            head_file = Path(head_path)
            if not head_file.is_file():
                raise FileNotFoundError(f"aesthetic: head file {str(head_file)!r} does not exist")
        else:
            head_file = find_file(directory, [AESTHETIC_HEAD, "aesthetic_head.pth", "aesthetic_head.safetensors"],
                                  self.name, expected)
        if clip_path is not None:
            clip_dir = as_dir(clip_path, self.name, HF_CLIP_FILES)
        else:
            subdirs = [directory / "clip-vit-large-patch14", directory / "clip", directory]
            found = [d for d in subdirs if (d / "config.json").is_file() and has_weights(d)]
            if not found:
                raise FileNotFoundError(f"aesthetic: no CLIP model under {str(directory)!r}; expected {expected} "
                                        f"(looked in {[str(d) for d in subdirs]})")
            clip_dir = found[0]
        model, tok = load_clip(clip_dir, self.name)
        self._setup(model, tok, device, dtype, *image_settings(clip_dir, model.config.vision_config.image_size))
        head = AestheticHead.from_state_dict(load_torch_file(head_file, self.name), str(head_file))
        if head.layers[0].in_features != model.config.projection_dim:
            raise ValueError(f"aesthetic: head {str(head_file)!r} takes {head.layers[0].in_features}-dim features but "
                             f"the CLIP model in {str(clip_dir)!r} makes {model.config.projection_dim}-dim ones")
        self.head = head.eval().requires_grad_(False).to(self.device)

    def to(self, device: str | torch.device) -> "AestheticScore":
        super().to(device)
        self.head.to(device)
        return self

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        return self.head(self.encode_image(images)).squeeze(-1)
