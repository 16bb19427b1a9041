"""A learned Bradley-Terry reward model (the RLHF recipe of Christiano et al. 2017 / Ouyang et al.
2022, as used for text-to-image by ImageReward and PickScore), small enough to train on CPU.

* **features (frozen)**: the image resized to ``image_size``; an average-pooled ``pool x pool``
  thumbnail (``3 pool^2`` values, for positions); ``color_features`` random ReLU features of
  each pixel's colour averaged over the image (a smooth colour histogram, for colour masses);
  optionally a random 5x5 convolution bank (``conv_channels``, ReLU, 4x4 average pool); all
  random weights are drawn from ``conv_seed`` and saved with the model; the prompt as a hashed
  bag of words and word bigrams (``text_buckets`` dims, CRC32 hash).
* **head (trained)**: ``h = relu(W_i img)``; FiLM by the prompt ``h = relu(h * (1 + g(txt)) + b(txt))``;
  then an MLP to one score. Differentiable in the images.
* **loss**: ``-log sigmoid(r(chosen) - r(rejected))`` with AdamW.

Saved like a transformers model: ``config.json`` + ``model.safetensors``; loaded with
``rewards.get("learned", path=DIR)``.

On the shapes world, :func:`make_shapes_pairs` builds pairs from renders and corrupted renders
ordered by the exact verifier. By default only the ``drop``, ``extra`` and ``recolor``
corruptions are used, so the model never sees a wrong *shape* or a wrong *relation
direction*: it is a deliberately imperfect proxy that a policy can hack. Measured (2000
training pairs, 1000 steps, ~5 s on one core): held-out pair accuracy 0.80 on the trained
corruption kinds, but 0.57 on ``reshape`` and 0.50 on ``flip`` pairs (chance) -- see
:func:`pair_accuracy`.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_range
from ..worlds import shapes as world
from .base import Reward, check_inputs
from .corrupt import CORRUPTIONS, corrupted_batch

MODEL_TYPE = "diffalign-bt-reward"
TRAIN_CORRUPTIONS = ("drop", "extra", "recolor")


@dataclass
class LearnedRewardConfig:
    """Architecture of :class:`BTRewardModel` (saved as ``config.json``)."""

    model_type: str = MODEL_TYPE
    image_size: int = 32
    pool: int = 4
    color_features: int = 32
    conv_channels: int = 0
    conv_seed: int = 0
    text_buckets: int = 128
    hidden: int = 128

    def __post_init__(self) -> None:
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"model_type must be {MODEL_TYPE!r}, got {self.model_type!r}")
        for name in ("image_size", "pool", "text_buckets", "hidden"):
            check_range(name, getattr(self, name), 1, None, integer=True)
        for name in ("color_features", "conv_channels"):
            check_range(name, getattr(self, name), 0, None, integer=True)


@dataclass
class Pairs:
    """Preference pairs: ``prompts[i]`` with ``chosen[i]`` preferred over ``rejected[i]`` ([N,3,H,W] in [0,1])."""

    prompts: list[str]
    chosen: Tensor
    rejected: Tensor
    kinds: list[str] | None = None  # how each rejected image was made (shapes pairs)

    def __post_init__(self) -> None:
        check_inputs(self.chosen, self.prompts, name="pairs.chosen")
        check_inputs(self.rejected, self.prompts, name="pairs.rejected")

    def __len__(self) -> int:
        return len(self.prompts)


def as_pairs(pairs: Pairs | Sequence[tuple[str, Tensor, Tensor]]) -> Pairs:
    """Accept a :class:`Pairs` or a sequence of ``(prompt, image_chosen [3,H,W], image_rejected)``."""
    if isinstance(pairs, Pairs):
        return pairs
    pairs = list(pairs)
    if not pairs or not all(isinstance(p, (tuple, list)) and len(p) == 3 for p in pairs):
        raise ValueError("pairs must be a Pairs or a non-empty list of (prompt, image_chosen, image_rejected)")
    return Pairs([p[0] for p in pairs], torch.stack([torch.as_tensor(p[1]) for p in pairs]).float(),
                 torch.stack([torch.as_tensor(p[2]) for p in pairs]).float())


def hash_text(prompts: Sequence[str], buckets: int) -> Tensor:
    """Hashed bag of words + word bigrams, L2-normalised: ``[B, buckets]``."""
    out = torch.zeros(len(prompts), buckets)
    for i, p in enumerate(prompts):
        words = p.lower().split()
        for tok in words + [f"{a}_{b}" for a, b in zip(words, words[1:])]:
            out[i, zlib.crc32(tok.encode()) % buckets] += 1.0
    return F.normalize(out, dim=-1)


class BTRewardModel(nn.Module):
    """Frozen pixel + random-conv features, FiLM-conditioned MLP head (see the module docstring)."""

    def __init__(self, cfg: LearnedRewardConfig):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.conv_seed)
        w = torch.randn(cfg.conv_channels, 3, 5, 5, generator=g)
        self.register_buffer("conv_weight", w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
        self.register_buffer("conv_bias", torch.randn(cfg.conv_channels, generator=g) * 0.5)
        c = torch.randn(cfg.color_features, 3, generator=g)
        self.register_buffer("color_weight", c / c.norm(dim=1, keepdim=True))
        self.register_buffer("color_bias", torch.rand(cfg.color_features, generator=g) * 2 - 1)
        n_img = 3 * cfg.pool**2 + cfg.color_features + cfg.conv_channels * 16
        self.img = nn.Linear(n_img, cfg.hidden)
        self.film = nn.Linear(cfg.text_buckets, 2 * cfg.hidden)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 1))
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def image_features(self, images: Tensor) -> Tensor:
        s = self.cfg.image_size
        x = images.float()
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        x = x * 2 - 1
        thumb = F.adaptive_avg_pool2d(x, self.cfg.pool).flatten(1)
        # random ReLU features of each pixel's colour, averaged: a smooth colour histogram (x16 ~ unit scale)
        feats = [thumb]
        if self.cfg.color_features:
            color = F.relu(torch.einsum("bchw,kc->bkhw", x, self.color_weight) + self.color_bias[:, None, None])
            feats.append(16 * color.mean((2, 3)))
        if self.cfg.conv_channels:
            conv = F.relu(F.conv2d(x, self.conv_weight, self.conv_bias, padding=2))
            feats.append(F.adaptive_avg_pool2d(conv, 4).flatten(1))
        return torch.cat(feats, 1)

    def head(self, img_feat: Tensor, txt_feat: Tensor) -> Tensor:
        h = F.relu(self.img(img_feat))
        gamma, beta = self.film(txt_feat).chunk(2, dim=-1)
        return self.mlp(F.relu(h * (1 + gamma) + beta)).squeeze(-1)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        txt = hash_text(prompts, self.cfg.text_buckets).to(images.device)
        return self.head(self.image_features(images), txt)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (each atomically)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, write in (("model.safetensors", lambda p: save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, p)),
                            ("config.json", lambda p: Path(p).write_text(json.dumps(asdict(self.cfg), indent=2)))):
            fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.")
            os.close(fd)
            try:
                write(tmp)
                os.replace(tmp, d / name)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "BTRewardModel":
        from safetensors.torch import load_file

        d = Path(directory)
        expected = "config.json + model.safetensors written by `diffalign train-reward`"
        if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
            raise FileNotFoundError(f"learned reward: {str(d)!r} is not a learned reward model directory; expected {expected}")
        try:
            raw = json.loads((d / "config.json").read_text())
            cfg = LearnedRewardConfig(**{f.name: raw[f.name] for f in fields(LearnedRewardConfig) if f.name in raw})
            model = cls(cfg)
            model.load_state_dict(load_file(str(d / "model.safetensors")))
        except Exception as e:  # noqa: BLE001 - a corrupt directory -> one clear error
            raise ValueError(f"learned reward: cannot load {str(d)!r} ({type(e).__name__}: {e}); expected {expected}") from e
        return model.eval()


class LearnedReward(Reward):
    """A trained :class:`BTRewardModel` as a reward (``rewards.get("learned", path=DIR)``); differentiable."""

    name = "learned"
    differentiable = True

    def __init__(self, path: Any = None, device: str = "cpu"):
        if path is None:
            raise ValueError("learned reward needs path=DIR (a directory written by `diffalign train-reward`)")
        self.model = BTRewardModel.from_pretrained(path).requires_grad_(False).to(device)

    def to(self, device: str | torch.device) -> "LearnedReward":
        self.model.to(device)
        return self

    def score(self, images: Tensor, prompts: list[str], meta: list[dict] | None) -> Tensor:
        return self.model(images.to(self.model.conv_weight.device), prompts)


def _to_tensor(images: np.ndarray) -> Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def make_shapes_pairs(n: int, seed: int = 0, corruptions: Sequence[str] = TRAIN_CORRUPTIONS,
                      split: str = "train") -> Pairs:
    """``n`` shapes-world pairs: a render (chosen) vs. a corrupted render (rejected), kept only where
    the exact verifier scores the render strictly higher. ``corruptions`` picks the kinds used
    (default: drop, extra, recolor -- no reshape / flip, so the learned reward is hackable)."""
    check_range("n", n, 1, None, integer=True)
    bad = [c for c in corruptions if c not in CORRUPTIONS]
    if not corruptions or bad:
        raise ValueError(f"corruptions must be a non-empty subset of {CORRUPTIONS}, got {list(corruptions)}")
    prompts_out: list[str] = []
    chosen: list[Tensor] = []
    rejected: list[Tensor] = []
    kinds: list[str] = []
    rnd = 0
    while len(prompts_out) < n:
        if rnd > 20:
            raise RuntimeError(f"could only build {len(prompts_out)} of {n} pairs with corruptions {list(corruptions)}")
        m = int((n - len(prompts_out)) * 1.3) + 8
        kw = {"kinds": ("relation",)} if set(corruptions) <= {"flip"} else {}
        prompts = world.sample_prompts(m, split=split, seed=seed * 1000 + rnd, **kw)
        good, layouts = world.render_batch(prompts, seed=seed * 1000 + rnd)
        bad_imgs, used, idx = corrupted_batch(prompts, layouts, corruptions, seed=seed * 1000 + rnd)
        rnd += 1
        if not idx:
            continue
        pr = [prompts[i] for i in idx]
        s_good = world.verify(good[idx], pr).score
        s_bad = world.verify(bad_imgs, pr).score
        keep = np.nonzero(s_good > s_bad)[0][: n - len(prompts_out)]
        prompts_out += [pr[i] for i in keep]
        kinds += [used[i] for i in keep]
        chosen.append(_to_tensor(good[idx][keep]))
        rejected.append(_to_tensor(bad_imgs[keep]))
    return Pairs(prompts_out, torch.cat(chosen), torch.cat(rejected), kinds)


def load_pairs_jsonl(file: str | os.PathLike, image_size: int = 32) -> Pairs:
    """Read JSONL lines ``{"prompt", "chosen", "rejected"}`` (image paths, relative to the file's
    folder), resized to ``image_size`` square (bicubic, antialiased)."""
    from PIL import Image

    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"pairs file {str(file)!r} does not exist")

    def load(p: str, where: str) -> Tensor:
        path = Path(p) if Path(p).is_absolute() else file.parent / p
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image {str(path)!r} does not exist")
        arr = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0
        x = torch.from_numpy(arr).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True)
        return x[0].clamp(0, 1)

    items = []
    for ln, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}:{ln}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise ValueError(f"{where}: expected an object with string fields 'prompt', 'chosen', 'rejected'")
        items.append((rec["prompt"], load(rec["chosen"], where), load(rec["rejected"], where)))
    if not items:
        raise ValueError(f"pairs file {str(file)!r} holds no pairs")
    return as_pairs(items)


@torch.no_grad()
def pair_accuracy(reward: Any, pairs: Pairs | Sequence, batch_size: int = 256) -> float:
    """Fraction of pairs where ``reward(chosen) > reward(rejected)``."""
    pairs = as_pairs(pairs)
    hits = 0
    for i in range(0, len(pairs), batch_size):
        pr = pairs.prompts[i:i + batch_size]
        hits += int((reward(pairs.chosen[i:i + batch_size], pr) > reward(pairs.rejected[i:i + batch_size], pr)).sum())
    return hits / len(pairs)


def train_bt_reward(pairs: Pairs | Sequence, *, out: str | os.PathLike | None, steps: int = 1000, batch_size: int = 128,
                    lr: float = 3e-3, weight_decay: float = 1e-4, seed: int = 0,
                    config: LearnedRewardConfig | None = None, log_every: int = 0) -> dict[str, Any]:
    """Train a Bradley-Terry reward on ``pairs`` and save it to ``out`` (if given).

    The frozen features are computed once, so each step only runs the small head. Returns
    ``{"model", "loss", "train_accuracy", "steps", "pairs", "out"}``.
    """
    pairs = as_pairs(pairs)
    check_range("steps", steps, 1, None, integer=True)
    check_range("batch_size", batch_size, 1, None, integer=True)
    check_range("lr", lr, 0, None, lo_open=True)
    torch.manual_seed(seed)
    model = BTRewardModel(config or LearnedRewardConfig())
    with torch.no_grad():
        fc, fr = model.image_features(pairs.chosen), model.image_features(pairs.rejected)
        txt = hash_text(pairs.prompts, model.cfg.text_buckets)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    n = len(pairs)
    loss = torch.tensor(0.0)
    for step in range(1, steps + 1):
        idx = torch.randint(n, (min(batch_size, n),), generator=gen)
        loss = -F.logsigmoid(model.head(fc[idx], txt[idx]) - model.head(fr[idx], txt[idx])).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"step {step}/{steps}  loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        acc = float((model.head(fc, txt) > model.head(fr, txt)).float().mean())
    if out is not None:
        model.save_pretrained(out)
    return {"model": model, "loss": float(loss.detach()), "train_accuracy": acc, "steps": steps, "pairs": n,
            "out": None if out is None else str(out)}
