"""Personalized Preference Fine-tuning (PPD; 2025, "Personalized Preference Fine-tuning of Diffusion
Models").

Diffusion-DPO aligns a model with the preferences of a population; PPD aligns it with each user's.
A user ``u`` is summarised by an embedding ``e_u`` extracted from a few of their pairwise choices
(the paper: a vision-language model reads about four examples), the model is conditioned on it
through cross-attention, and Diffusion-DPO trains on every user's pairs with their own embedding,
so that at sampling time a new user's few examples steer the model.

diffalign's construction, model-agnostic and without a VLM:

- **embedding**: ``e_u = mean_i normalise(phi(x^w_i) - phi(x^l_i))`` over the user's first
  ``shots`` pairs, ``phi`` the sample in model space average-pooled to ``pool x pool`` -- the
  direction in which the user's choices move the image;
- **conditioning**: ``e_u`` through a fixed random projection (seeded by ``projection_seed``,
  rescaled to the RMS of the empty prompt's token features) becomes one extra *context token* appended
  to the prompt's tokens, read by the model's cross-attention (the unconditional branch gets a
  masked / zero token). Models whose conditioning is a token sequence are supported (the shapes
  models; SD 1.x / 2.x / SDXL through the diffusers adapter);
- **pairs grouped by annotator**: ``source: file`` reads the annotator of each pair -- the
  labelling page's ``diffalign label --export FILE --per-annotator`` writes one line per
  annotator's vote; on-policy (``source: reference`` / ``policy``) the users are rewards
  (``users: {name: reward}``), each labelling the best and worst of every prompt's samples by
  its own score, as the paper's experiments with reward-defined users.

``personalize(model, e_u, cfg)`` wraps a model for sampling as user ``u`` (``generate`` accepts
the wrapper); :func:`user_embeddings` computes ``e_u`` from any user's pairs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check_positive
from ..core.parametrization import cond_index, cond_map
from ._policy_gradient import _unwrap
from ._rollout import safe_reward
from .preference import DiffusionDPO, DPOConfig, PairBatch, best_worst_pairs


# ----- embeddings and conditioning ------------------------------------------------------------------
def preference_features(x0: Tensor, pool: int) -> Tensor:
    """``phi``: samples ``[N, C, (F,) H, W]`` average-pooled to ``pool x pool``, flattened ``[N, C' pool^2]``."""
    x = x0.float().flatten(1, x0.ndim - 3)
    return F.adaptive_avg_pool2d(x, pool).flatten(1)


def user_embeddings(feat_w: Tensor, feat_l: Tensor, users: list[str], shots: int) -> dict[str, Tensor]:
    """``e_u`` from each user's first ``shots`` pairs (features of chosen / rejected images, in pair order)."""
    out: dict[str, Tensor] = {}
    for u in dict.fromkeys(users):
        rows = [i for i, v in enumerate(users) if v == u][:shots]
        d = F.normalize(feat_w[rows] - feat_l[rows], dim=1)
        out[u] = d.mean(0)
    return out


def _token_field(cond: Any) -> str:
    for name in ("tokens", "embeds"):
        if isinstance(getattr(cond, name, None), Tensor) and getattr(cond, name).ndim == 3:
            return name
    raise ValueError(f"PPD appends a user token to the prompt's token sequence; {type(cond).__name__} has no "
                     "[B, L, D] `tokens` or `embeds` field (models with token conditioning: the shapes models, "
                     "SD 1.x / 2.x / SDXL)")


def user_tokens(embeddings: Tensor, probe: Any, seed: int) -> Tensor:
    """``[U, D]`` tokens: a fixed random projection of ``[U, F]`` embeddings, rescaled to the RMS of the
    ``probe`` conditioning's tokens (the model's encoding of the empty prompt: the same in training and sampling)."""
    tokens = getattr(probe, _token_field(probe)).float()
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(embeddings.shape[1], tokens.shape[-1], generator=g).to(embeddings.device)
    out = embeddings.float() @ proj
    rms = tokens.pow(2).mean().sqrt()
    return out / out.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-8) * rms


def append_token(cond: Any, token: Tensor | None) -> Any:
    """``cond`` with one more context token ``[B, D]`` (``None``: a padding token -- masked where the
    conditioning has a mask, zero otherwise)."""
    name = _token_field(cond)
    seq = getattr(cond, name)
    tok = torch.zeros_like(seq[:, :1]) if token is None else token.to(seq)[:, None]
    fields = {name: torch.cat([seq, tok], dim=1)}
    mask = getattr(cond, "pad_mask", None)
    if isinstance(mask, Tensor):
        extra = torch.full_like(mask[:, :1], token is None)
        fields["pad_mask"] = torch.cat([mask, extra], dim=1)
    return dataclasses.replace(cond, **fields)


class PersonalizedModel:
    """A model whose prompts carry user ``u``'s token (the empty prompt a padding token); ``generate``
    and ``sample`` accept it like the model itself."""

    def __init__(self, model, token: Tensor):
        self.model, self.token = model, token

    def encode_prompts(self, prompts: list[str]) -> Any:
        cond = self.model.encode_prompts(prompts)
        personal = torch.tensor([p != "" for p in prompts])
        with_user = append_token(cond, self.token.expand(len(prompts), -1))
        without = append_token(cond, None)
        fn = lambda a, b: torch.where(personal.to(a.device).view(-1, *[1] * (a.ndim - 1)), a, b)  # noqa: E731
        return cond_map(fn, with_user, without)

    def __call__(self, x_t, t, cond):
        return self.model(x_t, t, cond)

    def __getattr__(self, name):
        return getattr(self.model, name)


def personalize(model, embedding: Tensor, cfg: "PPDConfig") -> PersonalizedModel:
    """``model`` sampling as the user of ``embedding`` (``[F]``) under the projection of ``cfg``."""
    probe = model.encode_prompts([""])
    return PersonalizedModel(model, user_tokens(embedding[None], probe, cfg.projection_seed)[0])


# ----- the algorithm -----------------------------------------------------------------------------------
@dataclass
class PPDConfig(DPOConfig):
    users: dict = field(default_factory=dict)  # on-policy: user name -> reward registry name that labels their pairs
    shots: int = 4  # pairs per user that define its embedding (the paper: ~4 examples)
    pool: int = 4  # phi: average-pool size of the preference features
    projection_seed: int = 0  # the fixed random projection embedding -> token

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("shots", self.shots, integer=True)
        check_positive("pool", self.pool, integer=True)
        if self.source == "file" and self.users:
            raise ValueError("users name rewards that label on-policy pairs; with source 'file' the users are the "
                             "pairs' annotators (leave `users` empty)")
        if self.source != "file" and len(self.users) < 1:
            raise ValueError(f"source {self.source!r}: give `users`, a mapping of user names to reward names "
                             "(e.g. {bright: brightness, correct: shapes})")
        if self.uncond_fraction > 0:
            raise ValueError("uncond_fraction must be 0 for ppd (the user token rides on the prompt)")


class PPD(DiffusionDPO):
    name = "ppd"

    def __init__(self, cfg: PPDConfig, *, reward: Callable, reference=None):
        super().__init__(cfg, reward=reward, reference=reference)
        from .. import rewards

        self.user_rewards = {u: rewards.get(r) for u, r in cfg.users.items()}
        self.embeddings: dict[str, Tensor] = {}  # fixed at the first epoch (part of the checkpoint)

    def state_dict(self) -> dict:
        return {"embeddings": {u: e.cpu() for u, e in self.embeddings.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.embeddings = {u: e.clone() for u, e in state["embeddings"].items()}

    def _user_pairs(self, model, prompts: list[str], epoch: int, seed: int) -> tuple[PairBatch, list[str]]:
        """Pairs ``[chosen..., rejected...]`` and the user of each pair."""
        if self.cfg.source == "file":
            batch = super().collect(model, prompts, epoch=epoch, seed=seed)
            users = [p.annotator for p in batch.source_pairs]
            bad = [u for u in users if not u or "," in u]
            if bad:
                raise ValueError(f"ppd groups pairs by annotator, but pairs of {self.cfg.data!r} have annotator "
                                 f"{bad[0]!r}; export one line per annotator (`diffalign label --export FILE "
                                 "--per-annotator`)")
            return batch, users
        b = super().collect(model, prompts, epoch=epoch, seed=seed)
        group = torch.arange(len(prompts)).repeat_interleave(self.cfg.group_size)
        chosen, rejected, users = [], [], []
        for u, r in self.user_rewards.items():
            scores, _ = safe_reward(r, b.images, b.prompts)
            w, lo = best_worst_pairs(scores, group, self.cfg.min_margin)
            chosen.append(w)
            rejected.append(lo)
            users += [u] * len(w)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        rows = torch.cat([chosen, rejected])
        M = len(chosen)
        pick = lambda x: None if x is None else x[rows.to(x.device)]  # noqa: E731
        batch = dataclasses.replace(
            b, prompts=[b.prompts[i] for i in rows.tolist()], pixels=b.pixels[rows], x0=b.x0[rows],
            cond=cond_index(b.cond, rows.to(b.x0.device)),
            uncond=None if b.uncond is None else cond_index(b.uncond, rows.to(b.x0.device)),
            chosen=torch.arange(M), rejected=torch.arange(M, 2 * M), rewards=pick(b.rewards))
        batch.info["pairs"] = float(M)
        return batch, users

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> PairBatch:
        cfg = self.cfg
        batch, users = self._user_pairs(model, prompts, epoch, seed)
        M = len(batch.chosen)
        if M == 0:
            return batch
        feat = preference_features(batch.x0, cfg.pool)
        new = [u for u in dict.fromkeys(users) if u not in self.embeddings]
        if new:
            emb = user_embeddings(feat[batch.chosen], feat[batch.rejected], users, cfg.shots)
            self.embeddings.update({u: emb[u].cpu() for u in new})
        tokens = user_tokens(torch.stack([self.embeddings[u] for u in users]).to(batch.x0.device),
                             _unwrap(model).encode_prompts([""]), cfg.projection_seed)
        batch.cond = append_token(batch.cond, torch.cat([tokens, tokens]))
        if batch.uncond is not None:
            batch.uncond = append_token(batch.uncond, None)
        batch.users = users + users  # type: ignore[attr-defined]
        batch.info["users"] = float(len(set(users)))
        return batch


PRESETS: dict[str, tuple[type, type, dict]] = {"ppd": (PPDConfig, PPD, {})}
