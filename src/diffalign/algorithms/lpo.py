"""LPO (2025, "Diffusion Model as a Noise-Aware Latent Reward Model for Step-Level Preference
Optimization").

Step-level preference methods (SPO, ``stepwise_preference.py``) rank the candidates ``x_{t'}`` of a
sampling step with a pixel-space reward of each one's decoded clean estimate -- a model that was
never meant for blurry early estimates, and a VAE decode per candidate. LPO ranks them with a
**latent reward model** (LRM) built from the diffusion model itself, which already perceives
noisy latents at every ``t``: ``r_phi(x_t, t, c)``, trained with the Bradley-Terry loss on
preference pairs noised to a random ``t`` (both images with the same noise)::

    L_LRM = -log sigmoid(r_phi(x^w_t, t, c) - r_phi(x^l_t, t, c))

Latent Preference Optimization then runs SPO's step-level sampler -- ``num_candidates`` from the
same ``x_t``, best against worst, step-wise DPO on the transition log-probabilities -- scoring in
latent space with the LRM, keeping a step pair when ``sigmoid(r_best - r_worst) > threshold`` and
only at ``t' <= max_t`` (the LRM's judgement of the noisiest latents is unreliable; the authors
train at ``t <= 750`` of 1000).

diffalign's LRM, small enough to train on a CPU: the *frozen* base diffusion model (the runtime's
reference) provides the features ``[x_t, x0_hat(x_t, t, c), x0_hat(x_t, t, c) - x0_hat(x_t, t, "")]``
-- its noise-aware clean estimate and the direction the prompt pulls it in (the analogue of the
authors' classifier-free-guidance feature enhancement) -- and a small convolutional head with a
FiLM time embedding maps them to ``r_phi`` (the authors fine-tune a copy of the UNet instead).
It is trained at the start of the run on the pairs of ``lrm_data`` (``lrm_steps`` AdamW steps;
10% of the pairs are held out and its accuracy on them is logged as ``lrm_heldout_acc``) and is
part of the run's checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_positive, check_range
from ..core.parametrization import cond_cat, cond_index, to_x0_eps
from ..core.prompts import negative_prompts
from ..core.schedules import sample_timesteps
from ._policy_gradient import _unwrap, model_prediction_type, model_schedule
from .stepwise_preference import SPO, SPOConfig


def lrm_features(model, x_t: Tensor, t: Tensor, cond: Any, uncond: Any) -> Tensor:
    """``[x_t, x0_hat_c, x0_hat_c - x0_hat_u]`` (channels; extra axes such as frames fold into them)."""
    schedule, ptype = model_schedule(model), model_prediction_type(model)
    out = model(torch.cat([x_t, x_t]), torch.cat([t, t]).float(), cond_cat(cond, uncond)).float()
    a, s = schedule.alpha_sigma(torch.cat([t, t]).double())
    x0 = to_x0_eps(out, torch.cat([x_t, x_t]).float(), a.float(), s.float(), ptype)[0]
    x0_c, x0_u = x0.chunk(2)
    feats = torch.cat([x_t.float(), x0_c, x0_c - x0_u], dim=1)
    return feats.flatten(1, feats.ndim - 3)


class LatentRewardHead(nn.Module):
    """``r_phi``: convolutions over the LRM features, FiLM by a Fourier embedding of ``t``, a scalar."""

    def __init__(self, in_channels: int, width: int = 32, t_features: int = 8):
        super().__init__()
        self.t_features = t_features
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU())
        self.film = nn.Linear(2 * t_features, 2 * width)
        self.out = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, feats: Tensor, t: Tensor) -> Tensor:
        freqs = torch.arange(1, self.t_features + 1, device=t.device, dtype=torch.float32) * math.pi
        emb = torch.cat([torch.sin(t.float()[:, None] * freqs), torch.cos(t.float()[:, None] * freqs)], dim=1)
        scale, shift = self.film(emb).chunk(2, dim=1)
        h = self.conv(feats)
        h = h * (1 + scale[..., None, None]) + shift[..., None, None]
        return self.out(h.mean(dim=(2, 3))).squeeze(-1)


def bradley_terry_loss(r_w: Tensor, r_l: Tensor) -> Tensor:
    return -F.logsigmoid(r_w - r_l).mean()


@dataclass
class LPOConfig(SPOConfig):
    lrm_data: str = ""  # pairs (.jsonl / .parquet / directory) the latent reward model is trained on
    lrm_steps: int = 300  # AdamW steps of the LRM head
    lrm_lr: float = 1e-3
    lrm_batch: int = 32  # pairs per LRM step
    lrm_width: int = 32  # channels of the LRM head
    threshold: float = 0.6  # a step pair needs sigmoid(r_best - r_worst) above this
    max_t: float = 0.75  # step pairs only where t' <= max_t

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lrm_data:
            raise ValueError("lpo needs `lrm_data`: preference pairs (e.g. `diffalign make-pairs` output) to train "
                             "its latent reward model on")
        for name in ("lrm_steps", "lrm_batch", "lrm_width"):
            check_positive(name, getattr(self, name), integer=True)
        check_positive("lrm_lr", self.lrm_lr)
        check_range("threshold", self.threshold, 0.5, 1, hi_open=True)
        check_range("max_t", self.max_t, 0, 1, lo_open=True)
        if self.step_score != "x0_hat":
            raise ValueError(f"lpo ranks candidates with its latent reward model: step_score must be 'x0_hat', "
                             f"got {self.step_score!r}")


class LPO(SPO):
    name = "lpo"

    def __init__(self, cfg: LPOConfig, *, reward: Callable, reference: Callable | None = None):
        super().__init__(cfg, reward=reward, reference=reference)
        self.head: LatentRewardHead | None = None
        self.lrm_info: dict[str, float] = {}

    def state_dict(self) -> dict:
        return {"head": None if self.head is None else self.head.state_dict(), "lrm_info": dict(self.lrm_info)}

    def load_state_dict(self, state: dict) -> None:
        if state["head"] is not None:
            self.head = self._new_head(next(iter(state["head"].values())).shape[1])
            self.head.load_state_dict(state["head"])
        self.lrm_info = dict(state["lrm_info"])

    def _new_head(self, in_channels: int) -> LatentRewardHead:
        return LatentRewardHead(in_channels, self.cfg.lrm_width)

    def reward_latents(self, x_t: Tensor, t: Tensor, cond: Any, uncond: Any) -> Tensor:
        """``r_phi(x_t, t, c)`` ``[B]`` (no gradient into the frozen backbone)."""
        feats = self.reference(lambda m: lrm_features(m, x_t, t, cond, uncond))
        return self.head(feats.to(next(self.head.parameters()).device), t)

    def train_lrm(self, model) -> None:
        """Fit the LRM head on ``lrm_data`` (deterministic: its own seeded generator)."""
        from ..data import load_pairs

        cfg, base = self.cfg, _unwrap(model)
        pairs = [p for p in load_pairs(cfg.lrm_data) if not p.tie]
        if len(pairs) < 2:
            raise ValueError(f"lrm_data={cfg.lrm_data!r} holds {len(pairs)} non-tie pairs; the LRM needs at least 2")
        device = next(base.parameters()).device
        with torch.no_grad():
            def encode(images):
                x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
                return torch.cat([base.encode_images(x[i:i + 64].to(device).float() / 255) for i in range(0, len(x), 64)])

            x_w, x_l = encode([p.chosen for p in pairs]), encode([p.rejected for p in pairs])
            prompts = [p.prompt for p in pairs]
            cond, uncond = base.encode_prompts(prompts), base.encode_prompts(negative_prompts(prompts))
        gen = torch.Generator().manual_seed(12345)
        perm = torch.randperm(len(pairs), generator=gen)
        n_val = max(1, len(pairs) // 10)
        val, train = perm[:n_val], perm[n_val:] if len(pairs) > n_val else perm
        schedule = model_schedule(base)

        def scores(rows: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
            a, s = (v.float().view(-1, *[1] * (x_w.ndim - 1)).to(device) for v in schedule.alpha_sigma(t.double()))
            c, u = cond_index(cond, rows.to(device)), cond_index(uncond, rows.to(device))
            t = t.to(device)
            return (self.reward_latents(a * x_w[rows] + s * noise, t, c, u),
                    self.reward_latents(a * x_l[rows] + s * noise, t, c, u))

        with torch.no_grad():
            probe = self.reference(lambda m: lrm_features(m, x_w[:1], torch.full((1,), 0.5, device=device),
                                                         cond_index(cond, slice(0, 1)), cond_index(uncond, slice(0, 1))))
        self.head = self._new_head(probe.shape[1]).to(device)
        opt = torch.optim.AdamW(self.head.parameters(), lr=cfg.lrm_lr)
        losses = []
        with torch.enable_grad():
            for _ in range(cfg.lrm_steps):
                rows = train[torch.randint(0, len(train), (min(cfg.lrm_batch, len(train)),), generator=gen)]
                t = sample_timesteps(schedule, len(rows), gen)
                noise = torch.randn((len(rows), *x_w.shape[1:]), generator=gen).to(device)
                loss = bradley_terry_loss(*scores(rows, t, noise))
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        with torch.no_grad():  # held-out pair accuracy, each pair at 4 noise levels up to max_t
            acc = []
            for frac in (0.25, 0.5, 0.75, 1.0):
                t = torch.full((len(val),), cfg.max_t * frac)
                noise = torch.randn((len(val), *x_w.shape[1:]), generator=gen).to(device)
                r_w, r_l = scores(val, t, noise)
                acc.append((r_w > r_l).float().mean().item())
        self.lrm_info = {"lrm_loss": float(np.mean(losses[-20:])), "lrm_heldout_acc": float(np.mean(acc)),
                         "lrm_pairs": float(len(pairs))}

    def score_candidates(self, model, cand: Tensor, t_prev: Tensor, cond_k: Any, uncond_k: Any,
                         prompts: list[str]) -> tuple[Tensor, int]:
        if uncond_k is None:
            uncond_k = _unwrap(model).encode_prompts(negative_prompts(prompts))
        t = t_prev.float().expand(len(cand)).to(cand.device)
        with torch.no_grad():
            return self.reward_latents(cand, t, cond_k, uncond_k).float().cpu(), 0

    def pair_ok(self, gap: Tensor, t_prev: Tensor) -> Tensor:
        return torch.isfinite(gap) & (torch.sigmoid(gap) > self.cfg.threshold) & (float(t_prev) <= self.cfg.max_t)

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int):
        if self.head is None:
            self.train_lrm(model)
        self.head.eval()
        batch = super().collect(model, prompts, epoch=epoch, seed=seed)
        batch.info.update(self.lrm_info)
        return batch


PRESETS: dict[str, tuple[type, type, dict]] = {"lpo": (LPOConfig, LPO, {})}
