"""Preference losses for video diffusion: DenseDPO's segment-level labels and VideoDPO's
OmniScore pair selection and re-weighting.

Video latents are ``[B, C, F, H, W]`` (frames on ``frame_dim``, 2 by default: the diffusers layout).
These are the losses, pair-building and labelling rules (pure functions, tested on hand-made
tensors); the algorithms that sample pairs and train with them are ``dense_dpo.py`` and
``video_dpo.py``.

- **DenseDPO** (2025, "DenseDPO: Fine-Grained Temporal Preference Optimization for Video Diffusion
  Models"): a pair is two denoisings of corrupted copies of one video, so the clips are aligned in
  time and can be compared segment by segment. Each of ``S`` temporal segments gets its own label
  ``y_s in {+1 (a better), -1 (b better), 0 (tie, no signal)}``, and Diffusion-DPO's margin is
  computed from the denoising errors of that segment's frames only::

      M_s = -beta T w(t) [(err^a_theta,s - err^a_ref,s) - (err^b_theta,s - err^b_ref,s)]
      L = sum_s |y_s| (-log sigmoid(y_s M_s)) / sum_s |y_s|

- **VideoDPO** (2025, "VideoDPO: Omni-Preference Alignment for Video Diffusion Generation"): the
  OmniScore of a video combines visual quality and text alignment scores; diffalign standardises
  each score over the prompt's ``N`` samples and averages them. The pair is the best against the
  worst sample by OmniScore, and each pair's loss is re-weighted by its score gap, normalised to
  mean 1 over the batch (``w_i = gap_i^alpha / mean_j gap_j^alpha``; ``alpha = 0``: unweighted).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._rollout import safe_reward
from .preference import DPO_WEIGHT


def segment_errors(residual: Tensor, num_segments: int, frame_dim: int = 2) -> Tensor:
    """Mean squared residual ``[B, S]`` of each of ``num_segments`` contiguous groups of frames
    (``torch.tensor_split`` sizes when the frames do not divide evenly)."""
    frames = residual.shape[frame_dim]
    if not 1 <= num_segments <= frames:
        raise ValueError(f"num_segments must be in [1, {frames}] (the number of frames), got {num_segments}")
    sq = residual.float().pow(2).movedim(frame_dim, 1)
    return torch.stack([seg.mean(dim=tuple(range(1, seg.ndim))) for seg in sq.tensor_split(num_segments, dim=1)],
                       dim=1)


def latent_frame_pixels(latent_frames: int, pixel_frames: int) -> list[list[int]]:
    """The decoded frames of each latent frame: the identity when the VAE keeps time, else the
    causal layout of the video VAEs (Wan, HunyuanVideo, CogVideoX): latent frame 0 is pixel frame 0
    and latent frame ``k >= 1`` pixel frames ``(k - 1) r + 1 .. k r``, ``r = (F_pix - 1) / (F_lat - 1)``."""
    if pixel_frames == latent_frames:
        return [[f] for f in range(latent_frames)]
    if latent_frames > 1 and pixel_frames > latent_frames and (pixel_frames - 1) % (latent_frames - 1) == 0:
        r = (pixel_frames - 1) // (latent_frames - 1)
        return [[0]] + [list(range((k - 1) * r + 1, k * r + 1)) for k in range(1, latent_frames)]
    raise ValueError(f"cannot match {latent_frames} latent frames to {pixel_frames} decoded frames: expected as many, "
                     "or 1 + r (latent frames - 1) (a causal video VAE that compresses time by r)")


def segment_scores(frame_scores: Tensor, latent_frames: int, num_segments: int) -> Tensor:
    """``[N, S]``: the mean per-frame score over the decoded frames of each segment, the segments
    being the contiguous groups of latent frames that :func:`segment_errors` compares (NaN where a
    frame's score failed)."""
    pixels = latent_frame_pixels(latent_frames, frame_scores.shape[1])
    if not 1 <= num_segments <= latent_frames:
        raise ValueError(f"num_segments must be in [1, {latent_frames}] (the latent frames), got {num_segments}")
    segs = torch.arange(latent_frames).tensor_split(num_segments)
    return torch.stack([frame_scores[:, [p for k in seg.tolist() for p in pixels[k]]].float().mean(1) for seg in segs],
                       dim=1)


def segment_labels(scores_a: Tensor, scores_b: Tensor, tie_margin: float) -> Tensor:
    """DenseDPO's labels ``[P, S]``: +1 where video a's segment scores more than ``tie_margin`` above
    b's, -1 where below, 0 (a tie, no signal) otherwise -- also where a score is NaN (a failed reward)."""
    d = scores_a - scores_b
    return (d > tie_margin).long() - (d < -tie_margin).long()


def frame_rewards(reward: Callable, videos: Tensor, prompts: list[str]) -> tuple[Tensor, int]:
    """``[N, F]`` scores of every frame of ``videos [N, F, 3, H, W]`` under an image reward (NaN
    where it failed), and the number of failed frames."""
    name = getattr(reward, "name", reward)
    if getattr(reward, "video", False) or getattr(reward, "groupwise", False):
        raise ValueError(f"reward {name!r} scores whole videos or groups; segment labels need an image reward, "
                         "scored on every frame")
    if getattr(reward, "frames", "mean") != "mean":
        raise ValueError(f"reward {name!r} has frames={reward.frames!r}; segment labels average every frame's score "
                         "over the segment: leave frames at 'mean'")
    N, F_ = videos.shape[:2]
    scores, failed = safe_reward(reward, videos.flatten(0, 1), [p for p in prompts for _ in range(F_)])
    return scores.view(N, F_), failed


def dense_dpo_loss(err_a: Tensor, err_b: Tensor, ref_err_a: Tensor, ref_err_b: Tensor, labels: Tensor,
                   beta: float) -> tuple[Tensor, dict[str, float]]:
    """DenseDPO on per-segment errors ``[B, S]`` with labels ``[B, S]`` in {-1, 0, +1} (module docstring)."""
    y = labels.to(err_a)
    if not torch.all((y == -1) | (y == 0) | (y == 1)):
        raise ValueError("segment labels must be -1, 0 or +1")
    margin = -beta * DPO_WEIGHT * ((err_a - ref_err_a) - (err_b - ref_err_b))
    terms = -F.logsigmoid(y * margin) * y.abs()
    loss = terms.sum() / y.abs().sum().clamp_min(1)
    labelled = y != 0
    acc = ((y * margin > 0) & labelled).sum() / labelled.sum().clamp_min(1)
    return loss, {"segment_acc": acc.item(), "labelled_frac": labelled.float().mean().item()}


def omni_score(scores: Tensor, group: Tensor) -> Tensor:
    """``[N]``: each column of ``scores [N, D]`` (quality and alignment dimensions) standardised within
    its prompt's group, averaged over the dimensions."""
    out = torch.zeros(scores.shape[0])
    for g in group.unique():
        rows = group == g
        s = scores[rows].float()
        z = (s - s.mean(0)) / s.std(0, unbiased=False).clamp_min(1e-8)
        out[rows] = z.mean(1)
    return out


def omni_pairs(scores: Tensor, group: Tensor, alpha: float = 1.0,
               min_gap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """VideoDPO's pairs: per group the best and worst sample by OmniScore, and their loss weights
    ``gap^alpha / mean(gap^alpha)``. Groups whose OmniScore gap is at most ``min_gap`` (all tie at
    0) give no pair."""
    omni = omni_score(scores, group)
    chosen, rejected, gaps = [], [], []
    for g in group.unique():
        idx = torch.nonzero(group == g).flatten()
        hi, lo = idx[omni[idx].argmax()], idx[omni[idx].argmin()]
        if omni[hi] - omni[lo] > min_gap:
            chosen.append(int(hi))
            rejected.append(int(lo))
            gaps.append(float(omni[hi] - omni[lo]))
    gap = torch.tensor(gaps)
    w = gap.pow(alpha)
    weights = w / w.mean().clamp_min(1e-12)
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long), weights


def weighted_dpo_loss(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, weights: Tensor,
                      beta: float) -> tuple[Tensor, dict[str, float]]:
    """Diffusion-DPO with per-pair loss weights (VideoDPO's re-weighting)."""
    margin = -beta * DPO_WEIGHT * ((err_w - ref_err_w) - (err_l - ref_err_l))
    loss = (weights.to(margin) * -F.logsigmoid(margin)).mean()
    return loss, {"reward_margin": margin.mean().item(), "implicit_acc": (margin > 0).float().mean().item()}
