"""DenseDPO (2025, "DenseDPO: Fine-Grained Temporal Preference Optimization for Video
Diffusion Models"), on-policy.

Diffusion-DPO's video pairs come from independent noise, so their motion differs and whole-clip
labels favour still clips. DenseDPO builds each pair from one video: a source ``x_0`` is corrupted
to an intermediate noise level ``t_c`` twice, with independent noise, and each copy is denoised::

    x^a_{t_c} = alpha(t_c) x_0 + sigma(t_c) e^a,   x^b_{t_c} = alpha(t_c) x_0 + sigma(t_c) e^b
    x^a = denoise(x^a_{t_c}),                    x^b = denoise(x^b_{t_c})

The two videos keep the source's layout and motion and differ in local detail, so they are aligned
in time and can be compared segment by segment. Each of ``S`` temporal segments (contiguous groups
of latent frames) gets its own label ``y_s in {+1, -1, 0}``, and the loss is Diffusion-DPO's on the
segment's frames only (``video_preference.dense_dpo_loss``)::

    M_s = -beta T w(t) [(err^a_theta,s - err^a_ref,s) - (err^b_theta,s - err^b_ref,s)]
    L = sum_s |y_s| (-log sigmoid(y_s M_s)) / sum_s |y_s|

Where the abstract leaves a rule open, diffalign's reading:

- **Source.** The paper corrupts ground-truth videos; diffalign has no video dataset reader, so the
  source is a sample of the frozen base model (``source: reference``, the default: offline pairs of
  a fixed model made on the fly) or of the current model (``source: policy``), drawn with the
  model's sampler from seeded noise. The copies are denoised by the same model on the sampling
  grid's points below ``t_c`` (``corrupt_t``, on the model's own time axis: ``x_t = (1 - t) x_0 +
  t e`` for flow models).
- **Labels.** The paper's labels come from people or a VLM; diffalign's from the training reward:
  an image reward scores every decoded frame, a segment's score is the mean over the frames its
  latent frames decode to (``latent_frame_pixels``: 1 + 4 (k - 1) .. 4 k for the causal video VAEs),
  and ``y_s = sign(score^a_s - score^b_s)`` where the gap exceeds ``tie_margin`` (0 otherwise, and
  where a score failed). A pair whose segments all tie is dropped.
- Both copies of a pair are noised at the same training ``t`` with the same noise (Diffusion-DPO).

Video models only (a sample ``[C, F, H, W]``); ``collect`` refuses an image model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import check_range
from ..core.parametrization import cond_cat
from ..core.prompts import negative_prompts
from ..core.sampling import seeded_noise
from ._policy_gradient import _unwrap, model_schedule
from ._rollout import sample_rows
from .balanced_dpo import pair_rows
from .preference import DiffusionDPO, DPOConfig, PairBatch, PairMicroBatch, sampling_settings, to_pixels
from .video_preference import dense_dpo_loss, frame_rewards, segment_errors, segment_labels, segment_scores


@dataclass
class DenseDPOConfig(DPOConfig):
    group_size: int = 2  # a DenseDPO pair is two denoisings of one source: always 2
    corrupt_t: float = 0.6  # t_c: noise level the source is corrupted to before each copy is denoised
    num_segments: int = 3  # S: temporal segments (contiguous groups of latent frames) labelled separately
    tie_margin: float = 0.0  # a segment's score gap at most this is a tie (label 0, no signal)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == "file":
            raise ValueError("source must be 'reference' or 'policy' for dense_dpo (its pairs are two denoisings of "
                             "one source video, sampled by a model), got 'file'")
        if self.group_size != 2:
            raise ValueError(f"group_size must be 2 for dense_dpo (a pair is two denoisings of one source video), "
                             f"got {self.group_size}")
        if self.min_margin:
            raise ValueError(f"min_margin={self.min_margin} applies to whole-sample rewards; dense_dpo labels each "
                             "segment and counts gaps within tie_margin as ties: set tie_margin instead")
        check_range("corrupt_t", self.corrupt_t, 0, 1, lo_open=True, hi_open=True)
        check_range("num_segments", self.num_segments, 1, None, integer=True)
        check_range("tie_margin", self.tie_margin, 0, None)


def video_frames(model, method: str) -> int:
    """The latent frames ``F`` of a video model (sample ``[C, F, H, W]``); refuses any other model."""
    base = _unwrap(model)
    shape = tuple(base.sample_shape)
    if len(shape) != 4:
        name = getattr(base, "arch", None) or type(base.get_base_model() if hasattr(base, "get_base_model")
                                                   else base).__name__
        raise ValueError(f"{method} trains video models: it needs a model whose sample is a 4-D latent [C, F, H, W]; "
                         f"the {name} model samples {shape} (an image model)")
    return shape[1]


def corruption_grid(grid: Tensor, t_c: float) -> Tensor:
    """``t_c`` followed by the sampling grid's points below it: where a corrupted copy is denoised."""
    below = grid[grid < t_c]
    if len(below) == 0:
        raise ValueError(f"corrupt_t={t_c} is at or below the last point of the sampling grid ({grid[-1].item():.4g})")
    return torch.cat([grid.new_tensor([t_c]), below])


class DenseDPO(DiffusionDPO):
    name = "dense_dpo"

    @torch.no_grad()
    def aligned_pairs(self, model, prompts: list[str], seed: int) -> dict:
        """Sources ``x_0 [P, ...]`` (seeds ``seed + i``), their corrupted copies ``x_{t_c} [2P, ...]`` (a
        copies, then b copies; noise from seeds ``seed + P + j``) and the denoised copies ``[2P, ...]``.
        Every draw is a function of ``seed`` (exact resume)."""
        cfg, P = self.cfg, len(prompts)
        s = sampling_settings(model, cfg)
        base = _unwrap(model)
        device = next(base.parameters()).device
        cond = base.encode_prompts(prompts)
        uncond = base.encode_prompts(negative_prompts(prompts)) if s["guidance_scale"] != 1.0 else None
        kw = {"batch_size": 2 * cfg.micro_batch_size, "sampler": s["sampler"], "guidance_scale": s["guidance_scale"],
              "eta": s["eta"], "sde_steps": None, "clip_sample": s.get("clip_sample") or 0.0}
        gen = torch.Generator(device).manual_seed(seed)
        noise = seeded_noise(base.sample_shape, [seed + i for i in range(P)], device)
        src = sample_rows(model, P, slice(0, P), cond, uncond, noise, gen, num_steps=s["num_steps"], **kw)[0][:, -1]
        schedule = model_schedule(model)
        t_c = torch.tensor(cfg.corrupt_t, dtype=torch.float64)
        alpha, sigma = (v.float().item() for v in schedule.alpha_sigma(t_c))
        e = seeded_noise(base.sample_shape, [seed + P + j for j in range(2 * P)], device)
        x_t = alpha * torch.cat([src, src]) + sigma * e
        grid = corruption_grid(schedule.timesteps(s["num_steps"]), cfg.corrupt_t)
        cond2 = cond_cat(cond, cond)
        uncond2 = None if uncond is None else cond_cat(uncond, uncond)
        x0 = sample_rows(model, 2 * P, slice(0, 2 * P), cond2, uncond2, x_t, gen, timesteps=grid, **kw)[0][:, -1]
        return {"source": src, "corrupted": x_t, "x0": x0, "cond": cond2}

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> PairBatch:
        cfg, P = self.cfg, len(prompts)
        frames = video_frames(model, self.name)
        if cfg.num_segments > frames:
            raise ValueError(f"num_segments={cfg.num_segments} exceeds the model's {frames} latent frames; "
                             f"choose num_segments in [1, {frames}]")
        pairs = (self.reference(lambda m: self.aligned_pairs(m, prompts, seed)) if cfg.source == "reference"
                 else self.aligned_pairs(model, prompts, seed))
        base = _unwrap(model)
        chunk = 2 * cfg.micro_batch_size  # VAEs of real video models decode a few clips at a time
        with torch.no_grad():
            videos = torch.cat([base.decode(pairs["x0"][i:i + chunk]).float().cpu()
                                for i in range(0, 2 * P, chunk)])
        both = list(prompts) * 2
        per_frame, failed = frame_rewards(self.reward, videos, both)
        seg = segment_scores(per_frame, frames, cfg.num_segments)
        labels = segment_labels(seg[:P], seg[P:], cfg.tie_margin)
        keep = torch.nonzero(labels.abs().sum(1) > 0).flatten()
        ok = per_frame[torch.isfinite(per_frame)]
        info = {"pairs": float(len(keep)), "reward_mean": ok.mean().item() if len(ok) else float("nan"),
                "reward_failed": float(failed), "segments_labelled": (labels != 0).float().mean().item(),
                "segment_gap": (seg[:P] - seg[P:]).abs().nanmean().item()}
        batch = PairBatch(prompts=both, pixels=to_pixels(videos), x0=pairs["x0"], cond=pairs["cond"],
                          uncond=self._uncond(model, both), chosen=keep, rejected=keep + P,
                          schedule=model_schedule(model), rewards=per_frame.mean(1), info=info)
        batch.labels = labels[keep]  # type: ignore[attr-defined]  # [M, S] for pair i = (chosen[i], rejected[i])
        batch.frame_rewards, batch.segment_rewards = per_frame, seg  # type: ignore[attr-defined]
        batch.source, batch.corrupted = pairs["source"], pairs["corrupted"]  # type: ignore[attr-defined]
        return batch

    def loss(self, model, micro: PairMicroBatch) -> tuple[Tensor, dict[str, float]]:
        S = self.cfg.num_segments
        err_a, err_b = segment_errors(self.errors(model, micro, reduce=False), S).chunk(2)
        ref_a, ref_b = segment_errors(self.errors(model, micro, reference=True, reduce=False), S).chunk(2)
        labels = micro.batch.labels[pair_rows(micro.batch, micro.idx[:len(err_a)])].to(err_a.device)
        loss, stats = dense_dpo_loss(err_a, err_b, ref_a, ref_b, labels, self.cfg.beta)
        return loss, {"loss": loss.item(), **stats, "err_a": err_a.mean().item(), "err_b": err_b.mean().item()}


PRESETS: dict[str, tuple[type, type, dict]] = {"dense_dpo": (DenseDPOConfig, DenseDPO, {})}
