"""PRDP (Deng et al. 2024, "PRDP: Proximal Reward Difference Prediction for Large-Scale Reward
Finetuning of Diffusion Models").

**Reward Difference Prediction.** For two images ``x^a, x^b`` of the same prompt ``c`` with their
denoising trajectories, the model predicts their reward difference from the trajectories'
log-likelihood ratios against the sampling policy ``theta_old``:

    r_hat_theta(x^a, x^b, c) = beta * sum_t [ log p_theta(x^a_{t-1} | x^a_t, c) / p_old(x^a_{t-1} | x^a_t, c)
                                             - log p_theta(x^b_{t-1} | x^b_t, c) / p_old(x^b_{t-1} | x^b_t, c) ]

and is trained by regression, ``L_RDP = E (r(x^a, c) - r(x^b, c) - r_hat_theta)^2`` -- a supervised
objective whose optimum is the optimum of the KL-regularised RL objective, which the paper shows is
far more stable than policy gradients on large prompt sets.

**Proximal updates.** The online algorithm samples ``G`` images per prompt, forms every pair of a
group, and optimises the objective step by step: at step ``t`` the sum is replaced by ``T`` times that
step's term (``T`` the trained steps per trajectory), and each log-ratio is clipped to
``[-eps, eps]`` (``clip_range``), so one update cannot move a step's likelihood far from the
sampling policy (no gradient once it leaves the interval). Rewards enter normalised within their
group (``std_normalize``; differences are unchanged by the centring), which makes ``beta``
independent of the reward's scale. ``beta`` here multiplies diffalign's log-probs, which are
*averaged* over the latent's dimensions (the DDPO convention): a per-dimension ``beta`` of 100 is
the paper's summed-log-prob ``beta`` divided by the number of dimensions. ``beta`` (the KL field of
every policy-gradient config) adds the closed-form KL to the reference model, as the paper's
KL-regularised variant.

Micro-batches hold whole groups (every pair is formed inside one); in an N-process run each
process must hold whole groups (``batch_size / N`` a multiple of ``group_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from ..config import check_positive
from ._policy_gradient import MicroBatch, OnlinePolicyGradient, PolicyGradientConfig
from ._rollout import Batch, group_advantages


@dataclass
class PRDPConfig(PolicyGradientConfig):
    prdp_beta: float = 100.0  # beta: scale of the predicted reward difference (per latent dimension, see above)
    clip_range: float = 1e-3  # eps: each step's log-ratio is clipped to [-eps, eps] (proximal update)
    std_normalize: bool = True  # rewards normalised within their group (False: centred only)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("prdp_beta", self.prdp_beta)
        if self.loss != "ppo":
            raise ValueError(f"loss={self.loss!r} does not apply to prdp: its objective is the reward-difference "
                             "regression; leave loss at 'ppo'")
        if self.micro_batch_size % self.group_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must be a multiple of group_size="
                             f"{self.group_size}: PRDP forms its pairs inside whole groups")
        if self.prompts_per_epoch < self.steps_per_epoch:
            raise ValueError(f"steps_per_epoch={self.steps_per_epoch} must be <= the prompts per epoch "
                             f"({self.prompts_per_epoch}): each optimiser step takes whole groups")


def rdp_loss(log_ratio: Tensor, target: Tensor, group: Tensor, *, scale: float, clip: float) -> tuple[Tensor, dict]:
    """PRDP's per-step regression over every pair of a group:
    ``mean_{a < b, same group} (y_a - y_b - scale [clip(rho_a) - clip(rho_b)])^2`` with ``rho`` the
    log-ratios ``log p_theta - log p_old`` at the step, ``y`` the (normalised) rewards and
    ``scale = beta T``. A micro-batch without a pair gives an exact zero (with its graph)."""
    pred = scale * log_ratio.float().clamp(-clip, clip)
    pairs = (group[:, None] == group[None, :]).triu(diagonal=1).to(pred.device)
    if not pairs.any():
        return (pred * 0).sum(), {"rdp_pairs": 0.0}
    y = target.to(pred.device).float()
    err = (y[:, None] - y[None, :]) - (pred[:, None] - pred[None, :])
    loss = err[pairs].pow(2).mean()
    with torch.no_grad():
        stats = {"rdp_pairs": float(pairs.sum()), "clip_frac": (log_ratio.abs() > clip).float().mean().item(),
                 "approx_kl": (0.5 * log_ratio.float() ** 2).mean().item()}
    return loss, stats


class PRDP(OnlinePolicyGradient):
    name = "prdp"

    def sample_batch(self, model, prompts: list[str], *, epoch: int, seed: int) -> Batch:
        world, G = self.shard.world, self.cfg.group_size
        if world > 1 and (self.cfg.batch_size // world) % G:
            raise ValueError(f"prdp forms pairs inside groups, so each of the {world} processes must hold whole "
                             f"groups: batch_size / processes = {self.cfg.batch_size // world} must be a multiple "
                             f"of group_size={G}")
        return super().sample_batch(model, prompts, epoch=epoch, seed=seed)

    def advantages(self, batch: Batch) -> Tensor:
        return group_advantages(batch.rewards, batch.group, std=self.cfg.std_normalize)

    def minibatches(self, batch: Batch, generator: torch.Generator) -> Iterator[list[MicroBatch]]:
        """Like the policy-gradient core's plan, over whole groups: each optimiser step takes a chunk of
        the groups on every trained step, ``micro_batch_size / G`` groups per micro-batch (rows of one step:
        a pair compares two samples of one group at the same step)."""
        cfg, shard, G = self.cfg, self.shard, self.cfg.group_size
        n = len(batch) * shard.world
        groups = torch.randperm(n // G, generator=generator)
        steps = self.train_steps(batch, generator)
        for chunk in groups.chunk(cfg.steps_per_epoch):
            rows = [(part[:, None] * G + torch.arange(G)).flatten() for part in chunk.split(cfg.micro_batch_size // G)]
            yield [self._own_part(batch, idx, torch.full_like(idx, j), shard.part(n)) for j in steps for idx in rows]

    def trained_steps_per_trajectory(self, batch: Batch) -> int:
        k = int(batch.sde_mask.sum())
        return max(1, round(self.cfg.timestep_fraction * k))

    def loss(self, model, micro: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        cfg, batch, idx, j = self.cfg, micro.batch, micro.idx, micro.steps
        r = self.rescore(model, micro)
        log_ratio = r.step.log_prob - batch.log_probs[idx, j].to(r.step.log_prob.device)
        pair_key = batch.group[idx] * len(batch.sde_mask) + j  # pairs: one group at one step
        loss, stats = rdp_loss(log_ratio, batch.advantage(idx, j), pair_key,
                               scale=cfg.prdp_beta * self.trained_steps_per_trajectory(batch), clip=cfg.clip_range)
        stats["policy_loss"] = loss.detach()
        loss = self.add_kl(model, r, loss, stats)
        stats["loss"] = loss.detach()
        return loss, stats


PRESETS: dict[str, dict] = {"prdp": {}}
