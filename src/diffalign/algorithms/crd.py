"""Centered Reward Distillation ("Diffusion Reinforcement Learning via Centered Reward
Distillation") on the forward-process machinery of ``forward_process.py``: the implicit reward
``rho = -(l_theta - l_old) / sg(l_old)`` regressed, centred within each prompt's group (which
cancels the normaliser ``log Z``), onto the centred advantage; rollouts from a separately decayed
sampling snapshot; KL anchored to the CFG-guided pretrained model with reward-adaptive strength.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..config import check_positive, check_range
from ._rollout import Batch
from .forward_process import (
    ForwardMicroBatch,
    ForwardProcessConfig,
    ForwardProcessRL,
    OldPolicy,
    _OldPolicyModel,
    final_rollout,
    finish_batch,
    matching_loss,
    sample_times,
)


@dataclass
class CRDConfig(ForwardProcessConfig):
    crd_scale: float = 1.0  # tau: implicit-reward scale (the inverse KL temperature)
    reward_adaptive_kl: bool = True  # KL strength beta * clip(mean reward, 0, 1)
    sample_decay_start: float = 0.0  # the sampling snapshot's own decay schedule (decoupled sampler)
    sample_decay_slope: float = 0.0
    sample_decay_max: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("crd_scale", self.crd_scale)
        for name in ("sample_decay_start", "sample_decay_max"):
            check_range(name, getattr(self, name), 0, 1, hi_open=True)
        check_range("sample_decay_slope", self.sample_decay_slope, 0, None)
        if self.micro_batch_size % self.group_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must be a multiple of group_size="
                             f"{self.group_size}: CRD centres within each prompt's group")
        if (self.batch_size // self.steps_per_epoch) % self.group_size:
            raise ValueError(f"batch_size / steps_per_epoch = {self.batch_size // self.steps_per_epoch} must be a "
                             f"multiple of group_size={self.group_size}: CRD centres within whole groups")
        if self.skip_zero_std_groups:
            raise ValueError("skip_zero_std_groups=True is not supported by CRD: its steps take whole groups in equal "
                             "shares; use diffusion_nft or awm")

    def sample_decay(self, epoch: int) -> float:
        return min(self.sample_decay_start + self.sample_decay_slope * epoch, self.sample_decay_max)


def centred_by_group(x: Tensor, group: Tensor) -> Tensor:
    """``x_i - mean_{j in group(i)} x_j``."""
    out = torch.zeros_like(x)
    for g in group.unique():
        m = group == g
        out[m] = x[m] - x[m].mean()
    return out


def crd_loss(loss_theta: Tensor, loss_old: Tensor, adv: Tensor, group: Tensor, scale: float) -> Tensor:
    """Per-sample ``(tau (rho_i - mean_g rho) - (A_i - mean_g A))^2`` with the implicit reward
    ``rho = -(l_theta - l_old) / sg(l_old)``; adding a constant to a group's rewards changes nothing."""
    rho = -(loss_theta - loss_old.detach()) / loss_old.detach().clamp_min(1e-8)
    return (scale * centred_by_group(rho, group) - centred_by_group(adv, group)) ** 2


class CRD(ForwardProcessRL):
    name = "crd"
    samples_with_policy = False  # rollouts run the sampling snapshot's weights

    def __init__(self, cfg: CRDConfig, *, reward: Callable, reference: Callable | None = None):
        super().__init__(cfg, reward=reward, reference=reference)
        self.sampler_policy = OldPolicy()
        self._mean_reward = 0.0

    def collect(self, model, prompts, *, epoch, seed):
        """Roll out with the sampling snapshot; score implicit rewards against the (separately
        decayed) old model."""
        cfg = self.cfg
        self.sampler_policy.update(model, cfg.sample_decay(epoch))
        self.old.update(model, cfg.decay(epoch))
        wrapped = _OldPolicyModel(model, self.sampler_policy)
        batch = finish_batch(final_rollout(wrapped, prompts, self.reward, cfg, seed), model, cfg)
        batch.info["old_decay"], batch.info["sample_decay"] = cfg.decay(epoch), cfg.sample_decay(epoch)
        ok = batch.rewards[batch.valid]
        self._mean_reward = float(ok.mean()) if len(ok) else 0.0
        return batch

    def _chunks(self, batch: Batch, generator: torch.Generator) -> list[Tensor]:
        """Whole groups per optimiser step and per micro-batch (centring needs the group)."""
        groups = batch.group.unique()
        order = groups[torch.randperm(len(groups), generator=generator)]
        members = [torch.nonzero(batch.group == g).flatten() for g in order]
        per_step = len(members) // self.cfg.steps_per_epoch
        return [torch.cat(members[i:i + per_step]) for i in range(0, len(members), per_step)]

    def minibatches(self, batch: Batch, generator: torch.Generator):
        """Each group shares its noise level and noise draw at every pass (paired comparison)."""
        cfg, G = self.cfg, self.cfg.group_size
        x0 = batch.latents
        for chunk in self._chunks(batch, generator):
            n_groups = len(chunk) // G
            idx = chunk.repeat(cfg.timesteps_per_sample)
            t = sample_times(n_groups * cfg.timesteps_per_sample, cfg, generator).repeat_interleave(G)
            noise = torch.randn((n_groups * cfg.timesteps_per_sample, *x0.shape[1:]), generator=generator)
            noise = noise.repeat_interleave(G, dim=0).to(x0.dtype)
            unit = torch.arange(n_groups * cfg.timesteps_per_sample).repeat_interleave(G)
            yield [ForwardMicroBatch(batch, idx[s], t[s], noise[s], unit[s], reg=self.draw_reg(len(s), x0, generator))
                   for s in torch.arange(len(idx)).split(cfg.micro_batch_size)]

    def kl_coef(self, batch: Batch) -> float:
        if not self.cfg.reward_adaptive_kl:
            return self.cfg.beta
        return self.cfg.beta * min(max(self._mean_reward, 0.0), 1.0)

    def policy_loss(self, pred, pred_old, target, x0, x_t, alpha_sigma, t, adv, micro, model):
        l_theta, l_old = matching_loss(pred, target), matching_loss(pred_old, target)
        per = crd_loss(l_theta, l_old, adv, micro.unit.to(pred.device), self.cfg.crd_scale)
        return per, {"matching_loss": l_theta.mean().detach()}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["sampler"] = None if self.sampler_policy.params is None else {
            k: v.cpu() for k, v in self.sampler_policy.params.items()}
        state["mean_reward"] = self._mean_reward
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        s = state.get("sampler")
        self.sampler_policy.params = None if s is None else {k: v.clone() for k, v in s.items()}
        self._mean_reward = state.get("mean_reward", 0.0)


PRESETS: dict[str, tuple[type, type, dict]] = {
    "crd": (CRDConfig, CRD, {"beta": 0.1, "kl_guidance_scale": 3.0, "decay_start": 0.25, "decay_slope": 0.005,
                             "decay_max": 0.999}),
}
