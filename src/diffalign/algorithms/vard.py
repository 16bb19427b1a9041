"""VARD (Dai et al. 2025, "VARD: Efficient and Dense Fine-Tuning for Diffusion Models with Value-based RL").

1. **Value function.** A network ``V_phi(x_t, t, c)`` predicts the expected reward of the image a
   state leads to, ``V(x_t, t, c) ~ E[r(x_0, c) | x_t]``. It is trained by regression on the
   policy's own rollouts: every latent ``x_{t_j}`` of a trajectory is an input, the trajectory's final
   reward the target (``value_steps`` Adam steps per epoch on the epoch's rollouts, ``value_lr``).
   The reward itself is never differentiated, so any reward works -- the shapes verifier included.
2. **Dense, differentiable supervision.** Each trained step ``x_{t_j} -> x_{t_{j+1}}`` of a stored
   trajectory is recomputed under the current policy with its noise held fixed (the
   reparametrised step ``x'_{t_{j+1}} = x_{t_{j+1}} + mu_theta - sg(mu_theta)``: the stored sample
   in value, the policy's mean in gradient), and the policy ascends the value of where the step
   lands, with the closed-form KL of its Gaussian step to the pretrained model's as regulariser:
   ``L_j = -value_weight * V_phi(x'_{t_{j+1}}, t_{j+1}, c) + beta KL(p_theta(. | x_{t_j}) || p_ref(. | x_{t_j}))``.
   Every step gets a signal of its own, and the gradient is a pathwise one through a single step.

The policy stays untouched for ``value_warmup_epochs`` epochs while the value function learns the
base model's rollouts (the paper pretrains it before fine-tuning). The value network is small and
model-agnostic: convolutions over the latent (with coordinate channels, so positions are visible),
FiLM-conditioned on the time and a hashed bag of words of the prompt (``rewards.learned.hash_text``);
it and its optimiser are part of the algorithm state (``--resume``). In an N-process run each
process fits the value on its own rollouts and the value gradients are averaged over processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_choice, check_positive, check_range
from ..rewards.learned import hash_text
from ._aux_net import AuxNet
from ._policy_gradient import MicroBatch, OnlinePolicyGradient, PolicyGradientConfig
from ._rollout import Batch, group_advantages


@dataclass
class VARDConfig(PolicyGradientConfig):
    beta: float = 0.1  # KL coefficient to the pretrained model (VARD's regulariser; must be > 0)
    value_weight: float = 1.0  # scale of -V in the policy loss
    value_lr: float = 1e-3  # Adam learning rate of phi
    value_steps: int = 20  # value regression steps per epoch
    value_batch: int = 128  # latents per value step
    value_hidden: int = 32  # channels of the value network
    value_warmup_epochs: int = 2  # epochs in which only the value function trains
    value_target: str = "advantage"  # what V regresses on: advantage (reward normalised in its group) | reward

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("beta", self.beta)
        for name in ("value_weight", "value_lr"):
            check_positive(name, getattr(self, name))
        for name in ("value_steps", "value_batch", "value_hidden"):
            check_positive(name, getattr(self, name), integer=True)
        check_range("value_warmup_epochs", self.value_warmup_epochs, 0, None, integer=True)
        check_choice("value_target", self.value_target, ["advantage", "reward"])
        if self.loss != "ppo":
            raise ValueError(f"loss={self.loss!r} does not apply to vard: the policy ascends the value function; "
                             "leave loss at 'ppo'")


class ValueNet(nn.Module):
    """``V_phi(x_t, t, c)``: convolutions over the latent and two coordinate maps, FiLM by
    ``[time features, hashed prompt]``, mean- and max-pooled, then an MLP to one value."""

    def __init__(self, channels: int, hidden: int = 32, text_buckets: int = 256, time_features: int = 16):
        super().__init__()
        self.text_buckets, self.time_features = text_buckets, time_features
        self.convs = nn.ModuleList([nn.Conv2d(channels + 2, hidden, 3, padding=1),
                                    nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
                                    nn.Conv2d(hidden, hidden, 3, stride=2, padding=1)])
        self.film = nn.Linear(text_buckets + time_features, 2 * hidden)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    @staticmethod
    def as_image(x: Tensor) -> Tensor:
        """Any latent ``[B, C, ...]`` as ``[B, C, H, W]`` (a latent that is not 2-D becomes one row)."""
        return x if x.ndim == 4 else x.reshape(x.shape[0], x.shape[1], 1, -1)

    def forward(self, x: Tensor, t: Tensor, prompts: list[str]) -> Tensor:
        h = self.as_image(x).float()
        B, _, H, W = h.shape
        ys = torch.linspace(-1, 1, H, device=h.device).view(1, 1, H, 1).expand(B, 1, H, W)
        xs = torch.linspace(-1, 1, W, device=h.device).view(1, 1, 1, W).expand(B, 1, H, W)
        h = torch.cat([h, ys, xs], dim=1)
        for conv in self.convs:
            h = F.silu(conv(h))
        freqs = torch.exp(torch.arange(self.time_features // 2, device=h.device) * (math.log(1000.0) / 8))
        t = torch.as_tensor(t, device=h.device, dtype=torch.float32).expand(B)
        tf = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
        gain, bias = self.film(torch.cat([tf, hash_text(prompts, self.text_buckets).to(h.device)], 1)).chunk(2, 1)
        h = F.silu(h * (1 + gain[:, :, None, None]) + bias[:, :, None, None])
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)).squeeze(1)


class VARD(OnlinePolicyGradient):
    name = "vard"

    def __init__(self, cfg: VARDConfig, **kw):
        if kw.get("reference") is None:
            raise ValueError("vard regularises with the KL to the pretrained model: it needs a reference model "
                             "(beta > 0)")
        super().__init__(cfg, **kw)
        self.aux = AuxNet(("value", "value_opt"))
        self._epoch = 0

    @property
    def value(self) -> ValueNet | None:
        return self.aux.net

    @value.setter
    def value(self, net: torch.nn.Module) -> None:  # tests put a hand-made value in
        self.aux.net = net

    # -- value function ---------------------------------------------------------------------------
    def _init_value(self, model) -> None:
        if self.value is not None:
            return
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same initial value network on every process and every run
            net = ValueNet(model.sample_shape[0], self.cfg.value_hidden).to(device).requires_grad_(False)
        self.aux.build(net, torch.optim.Adam(net.parameters(), lr=self.cfg.value_lr))

    def fit_value(self, batch: Batch, seed: int) -> dict[str, float]:
        """``value_steps`` regression steps of ``V_phi`` on every latent of the epoch's own rollouts,
        the target each trajectory's final reward; gradients averaged over processes."""
        cfg, value = self.cfg, self.value
        rows = batch.valid.nonzero().flatten()
        T1 = batch.latents.shape[1]
        pairs = (rows[:, None] * T1 + torch.arange(T1)).flatten()  # (sample, latent) pairs
        gen = torch.Generator().manual_seed(seed + 2)
        params = list(value.parameters())
        value.requires_grad_(True)
        losses = []
        try:
            for _ in range(cfg.value_steps):
                if len(pairs) == 0:
                    break
                pick = pairs[torch.randint(len(pairs), (min(cfg.value_batch, len(pairs)),), generator=gen)]
                i, j = pick // T1, pick % T1
                x = batch.latents[i, j]
                pred = value(x, batch.t[j].to(x.device).float(), [batch.prompts[k] for k in i.tolist()])
                loss = F.mse_loss(pred, self.value_targets(batch)[i].to(pred.device))
                grads = torch.autograd.grad(loss, params)
                if self.shard.world > 1:  # the mean gradient over processes
                    flat = self.shard.all(torch.cat([g.flatten() for g in grads])[None]).mean(0)
                    grads = torch.split(flat, [p.numel() for p in params])
                for p, g in zip(params, grads):
                    p.grad = g.reshape(p.shape)
                self.aux.opt.step()
                self.aux.opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
        finally:
            value.requires_grad_(False)
        with torch.no_grad():  # how much of the final reward the value explains at x_0
            x0 = batch.latents[rows, -1]
            v0 = value(x0, batch.t[-1].float(), [batch.prompts[k] for k in rows.tolist()]).cpu()
            r = self.value_targets(batch)[rows]
            r2 = 1 - ((v0 - r) ** 2).mean() / r.var(unbiased=False).clamp_min(1e-8) if len(rows) > 1 else 0.0
        return {"value_loss": sum(losses) / max(1, len(losses)), "value_r2_x0": float(r2)}

    def value_targets(self, batch: Batch) -> Tensor:
        return batch.advantages if self.cfg.value_target == "advantage" else batch.rewards

    # -- the Algorithm protocol ---------------------------------------------------------------------
    def advantages(self, batch: Batch) -> Tensor:  # the value's targets (value_target: advantage)
        return group_advantages(batch.rewards, batch.group)

    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> Batch:
        self._init_value(model)
        batch = super().collect(model, prompts, epoch=epoch, seed=seed)
        batch.info.update(self.fit_value(batch, seed))
        self._epoch = epoch
        return batch

    def minibatches(self, batch: Batch, generator: torch.Generator) -> Iterator[list[MicroBatch]]:
        if self._epoch < self.cfg.value_warmup_epochs:  # value warm-up: no policy update
            return iter(())
        return super().minibatches(batch, generator)

    def loss(self, model, micro: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        cfg, batch, idx, j = self.cfg, micro.batch, micro.idx, micro.steps
        r = self.rescore(model, micro)
        mean = r.step.mean
        x_next = r.x_prev + (mean - mean.detach())  # the stored sample, differentiable through the step's mean
        v = self.value(x_next, batch.t[j + 1].float(), [batch.prompts[k] for k in idx.tolist()])
        loss = -cfg.value_weight * v.float().mean()
        stats = {"value_pred": v.mean().detach(), "policy_loss": loss.detach()}
        loss = self.add_kl(model, r, loss, stats)
        stats["loss"] = loss.detach()
        return loss * micro.weight, stats

    # -- state (resume) -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.aux.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.aux.load_state_dict(state)


PRESETS: dict[str, dict] = {"vard": {}}
