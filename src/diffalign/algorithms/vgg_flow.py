"""VGG-Flow (Liu et al. 2025, "Value Gradient Guidance for Flow Matching Alignment").

Alignment of a flow model as deterministic optimal control: the fine-tuned velocity
``v_theta = v_base + v~`` minimises ``E[lambda/2 int ||v~||^2 dt - r(x_0)]``. The HJB equation
of this problem gives the optimal residual as a value gradient and a consistency condition on
that gradient. In diffalign's time (``t = 1`` noise, ``t = 0`` data, sampling runs ``t`` down,
``dx/dt = v``) and with ``G = grad_x V`` the gradient of the reward-to-go ``V``:

* **value-gradient matching**: ``v_theta(x, t) - v_base(x, t) = -G(x, t) / lambda``;
* **value consistency** (the gradient of the HJB equation along a trajectory of ``v_theta``):
  ``dG/dt = -J_base^T G`` with ``J_base = d v_base / dx``; between grid times ``t > t'``, to first
  order, ``G(x_t', t') = G(x_t, t) + (t - t') J_base(x_t)^T G(x_t, t)``;
* **boundary**: ``G(x, 0) = grad r(x)``.

The value gradient is parametrised with the paper's forward-looking initialisation,
``G_phi(x_t, t) = eta_t * stopgrad(grad_{x_t} r(x0_hat(x_t, t))) + nu_phi(x_t, t)``, where
``x0_hat = x_t - t v_theta(x_t, t)`` is the one-step Euler prediction of the data and ``eta_t``
rises from 0 at noise to 1 at data (``eta_schedule``); the learned residual ``nu_phi`` starts at 0
(a copy of the model behind a zero-initialised gate), so training starts from the reward gradient
of the one-step prediction. Three losses: matching (trains ``theta``; returned to the runtime),
consistency and boundary (train ``phi`` with the method's own optimiser). Losses are written in
velocity units (``u = G / lambda``, the guidance velocity), so the three are comparable.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import check_choice, check_positive, check_range
from ..core.parametrization import cond_index, guided_prediction, to_x0_eps
from ..core.prompts import negative_prompts
from ..core.sampling import sample, seeded_noise
from ._aux_net import AuxNet
from ._policy_gradient import _unwrap
from .reward_gradient import GradientBatch, check_batching, require_differentiable


@dataclass
class VGGFlowConfig:
    batch_size: int = 16  # trajectories (one prompt each) per epoch
    micro_batch_size: int = 8  # samples per forward pass
    steps_per_epoch: int = 1  # optimiser steps per pass over the batch
    inner_epochs: int = 1  # passes over each epoch's trajectories
    num_steps: int = 10  # T: Euler steps of the (ODE) sampler
    guidance_scale: float = 3.0  # CFG scale: the controlled velocity is the guided one
    beta: float = 0.01  # lambda: weight of the control cost lambda/2 int ||v_theta - v_base||^2 (> 0)
    eta_schedule: str = "linear"  # eta_t of the forward-looking term: linear (1 - t) | quadratic (1 - t)^2 | constant
    timestep_fraction: float = 0.5  # share of the T steps trained on per epoch
    value_net: bool = True  # learn the residual nu_phi; False: G is the forward-looking term alone
    value_lr: float = 1e-4  # Adam learning rate of phi
    consistency_weight: float = 1.0  # weight of the value-consistency loss (phi)
    boundary_weight: float = 1.0  # weight of the boundary loss G(x, 0) = grad r (phi)
    value_max_grad_norm: float = 1.0  # gradient clipping of phi

    def __post_init__(self) -> None:
        check_batching(self)
        check_positive("beta", self.beta)
        check_choice("eta_schedule", self.eta_schedule, ["linear", "quadratic", "constant"])
        check_range("timestep_fraction", self.timestep_fraction, 0, 1, lo_open=True)
        for name in ("value_lr", "value_max_grad_norm"):
            check_positive(name, getattr(self, name))
        for name in ("consistency_weight", "boundary_weight"):
            check_range(name, getattr(self, name), 0, None)

    @property
    def prompts_per_epoch(self) -> int:
        return self.batch_size


PRESETS: dict[str, dict] = {"vgg_flow": {}}


# ----- the losses, pure functions of tensors (u = G / lambda, velocity units) -----------------------
def matching_loss(v: Tensor, v_base: Tensor, u: Tensor) -> Tensor:
    """Value-gradient matching ``||v_theta - v_base + G / lambda||^2`` (mean over elements)."""
    return (v.float() - v_base.float() + u.detach().float()).pow(2).mean()


def consistency_loss(u_t: Tensor, jtu_t: Tensor, u_prev: Tensor, dt: float) -> Tensor:
    """Finite-difference value consistency ``||u(x_t) + dt J_base^T u(x_t) - u(x_t')||^2``: the gradient
    reaches ``u(x_t)`` only (the Jacobian product and the later time are targets)."""
    return (u_t.float() + dt * jtu_t.detach().float() - u_prev.detach().float()).pow(2).mean()


def eta_t(schedule: str, t: float) -> float:
    """Weight of the forward-looking term: 0 at noise, 1 at data (where ``G = grad r`` exactly)."""
    s = 1.0 - float(t)
    return {"linear": s, "quadratic": s * s, "constant": 1.0}[schedule]


@dataclass
class FlowBatch(GradientBatch):
    latents: Tensor | None = None  # [N, T+1, ...] ODE trajectories of the current model
    t: Tensor | None = None  # [T+1] time grid
    reward_grads: Tensor | None = None  # [N, ...] grad r at the final samples (the boundary values)


@dataclass
class VGGMicroBatch:
    batch: FlowBatch
    idx: Tensor
    step: int  # trajectory step j (x_{t_j} -> x_{t_{j+1}})
    n_micro: int  # micro-batches in its optimiser step (phi's gradients are averaged over them)
    last: bool  # last micro-batch of its optimiser step: phi steps after it


class _ValueResidual(torch.nn.Module):
    """``nu_phi(x, t, c) = gate * net(x, t, c)``: a copy of the model with a zero-initialised gate."""

    def __init__(self, model):
        super().__init__()
        self.net = copy.deepcopy(model).requires_grad_(False)
        trainable = self.net.trainable_module() if hasattr(self.net, "trainable_module") else self.net
        trainable.requires_grad_(True)
        self.gate = torch.nn.Parameter(torch.zeros((), device=next(self.net.parameters()).device))

    def forward(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self.gate * self.net(x, t, cond)


class VGGFlow:
    name = "vgg_flow"

    def __init__(self, cfg: VGGFlowConfig, *, reward: Callable, reference: Callable | None = None):
        require_differentiable(self.name, reward)
        if reference is None:
            raise ValueError("vgg_flow needs the pretrained velocity v_base: a reference model (beta > 0)")
        self.cfg, self.reward, self.reference = cfg, reward, reference
        self.aux = AuxNet(("nu", "opt"))

    # -- value-gradient network -------------------------------------------------------------------
    @property
    def nu(self) -> _ValueResidual | None:
        return self.aux.net

    @property
    def nu_opt(self) -> torch.optim.Optimizer | None:
        return self.aux.opt

    def _init_value_net(self, model) -> None:
        if not self.cfg.value_net or self.nu is not None:
            return
        nu = _ValueResidual(model)
        self.aux.build(nu, torch.optim.Adam([p for p in nu.parameters() if p.requires_grad], lr=self.cfg.value_lr))

    def state_dict(self) -> dict:
        return self.aux.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.aux.load_state_dict(state)

    # -- the Algorithm protocol -------------------------------------------------------------------
    def collect(self, model, prompts: list[str], *, epoch: int, seed: int) -> FlowBatch:
        cfg, m = self.cfg, _unwrap(model)
        if m.prediction_type != "flow":
            raise ValueError(f"vgg_flow needs a flow-matching model (prediction_type 'flow'), got "
                             f"{m.prediction_type!r}")
        self._init_value_net(m)
        device = next(m.parameters()).device
        with torch.no_grad():
            cond = m.encode_prompts(list(prompts))
            uncond = m.encode_prompts(negative_prompts(prompts)) if cfg.guidance_scale != 1.0 else None
            noise = seeded_noise(m.sample_shape, [seed + i for i in range(len(prompts))], device)
            traj = sample(m, cond, sampler="flow_ode", num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale,
                          noise=noise, uncond=uncond, return_trajectory=True)
        x0 = traj.latents[:, -1].detach().requires_grad_(True)
        with torch.enable_grad():
            images = m.decode(x0)
            r = self.reward(images, list(prompts))
            (grad_r,) = torch.autograd.grad(r.sum(), x0)
        batch = FlowBatch(list(prompts), cond, uncond, noise, seed, latents=traj.latents, t=traj.t,
                          reward_grads=grad_r.detach())
        batch.record(torch.arange(len(prompts)), images, r)
        return batch

    def minibatches(self, batch: FlowBatch, generator: torch.Generator) -> Iterator[list[VGGMicroBatch]]:
        cfg, T = self.cfg, self.cfg.num_steps
        perm = torch.randperm(len(batch), generator=generator)
        k = max(1, round(cfg.timestep_fraction * T))
        steps = torch.randperm(T, generator=generator)[:k].sort().values.tolist()
        for chunk in perm.chunk(cfg.steps_per_epoch):
            pairs = [(j, idx) for j in steps for idx in chunk.split(cfg.micro_batch_size)]
            yield [VGGMicroBatch(batch, idx, j, len(pairs), n == len(pairs) - 1) for n, (j, idx) in enumerate(pairs)]

    def loss(self, model, micro: VGGMicroBatch) -> tuple[Tensor, dict[str, float]]:
        cfg, batch, idx, j = self.cfg, micro.batch, micro.idx, micro.step
        lam = cfg.beta
        cond = cond_index(batch.cond, idx)
        uncond = None if batch.uncond is None else cond_index(batch.uncond, idx)
        prompts = [batch.prompts[i] for i in idx.tolist()]
        x_t, x_next = batch.latents[idx, j], batch.latents[idx, j + 1]
        t, t_next = batch.t[j], batch.t[j + 1]
        v, h_t = self.forward_looking(model, x_t, t, cond, uncond, prompts, keep_graph=True)
        u_t = eta_t(cfg.eta_schedule, t) * h_t / lam
        nu_t = self.nu(x_t, _times(t, x_t), cond) if self.nu is not None else None
        if nu_t is not None:
            u_t = u_t + nu_t
        v_base, jtu = self.base_velocity(x_t, t, cond, uncond, u_t.detach() if nu_t is not None else None)
        loss = matching_loss(v, v_base, u_t)
        stats = {"matching_loss": loss.item(), "residual_velocity": (v - v_base).detach().pow(2).mean().sqrt().item(),
                 "guidance_velocity": u_t.detach().pow(2).mean().sqrt().item()}
        if nu_t is not None:
            stats.update(self.value_step(micro, model, x_t, t, nu_t, u_t, jtu, x_next, t_next, cond, uncond, prompts))
        stats["loss"] = loss.item()
        return loss, stats

    # -- pieces -----------------------------------------------------------------------------------
    def forward_looking(self, model, x_t: Tensor, t: Tensor, cond, uncond, prompts: list[str], *,
                        keep_graph: bool) -> tuple[Tensor | None, Tensor]:
        """``(v_theta(x_t), grad_{x_t} r(x_t - t v_theta(x_t)))``: the guided velocity (with its graph
        if ``keep_graph``) and the reward gradient of the one-step Euler prediction (detached)."""
        m = _unwrap(model)
        x = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            v = guided_prediction(model, x, _times(t, x), cond, uncond, self.cfg.guidance_scale)
            alpha, sigma = m.schedule.alpha_sigma(t)
            x0_hat = to_x0_eps(v, x, alpha.float(), sigma.float(), "flow")[0]
            r = self.reward(m.decode(x0_hat), prompts)
            (h,) = torch.autograd.grad(r.sum(), x, retain_graph=keep_graph)
        return (v if keep_graph else None), h.detach().to(x_t.dtype)

    def base_velocity(self, x_t: Tensor, t: Tensor, cond, uncond, u: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``v_base(x_t)`` and, given ``u``, the vector-Jacobian product ``J_base(x_t)^T u``."""
        w = self.cfg.guidance_scale

        def run(m):
            if u is None:
                return guided_prediction(m, x_t, _times(t, x_t), cond, uncond, w), None
            with torch.enable_grad():
                x = x_t.detach().requires_grad_(True)
                vb = guided_prediction(m, x, _times(t, x), cond, uncond, w)
                (jtu,) = torch.autograd.grad(vb, x, grad_outputs=u.to(vb.dtype))
            return vb.detach(), jtu.detach()

        return self.reference(run)

    def value_step(self, micro, model, x_t, t, nu_t, u_t, jtu, x_next, t_next, cond, uncond, prompts) -> dict:
        """Consistency and boundary losses for ``phi``; its gradients accumulate over the optimiser
        step's micro-batches and ``phi`` steps after the last one."""
        cfg, batch, idx = self.cfg, micro.batch, micro.idx
        lam = cfg.beta
        with torch.no_grad():
            if micro.step + 1 == cfg.num_steps:  # t' = 0: x0_hat = x, the heuristic is grad r itself
                h_next = batch.reward_grads[idx]
            else:
                h_next = self.forward_looking(model, x_next, t_next, cond, uncond, prompts, keep_graph=False)[1]
            u_next = eta_t(cfg.eta_schedule, t_next) * h_next / lam + self.nu(x_next, _times(t_next, x_next), cond)
        cons = consistency_loss(u_t, jtu, u_next, float(t - t_next))
        x_end, g_end = batch.latents[idx, -1], batch.reward_grads[idx]
        u_end = eta_t(cfg.eta_schedule, 0.0) * g_end / lam + self.nu(x_end, _times(torch.zeros(()), x_end), cond)
        bnd = (u_end.float() - g_end.float() / lam).pow(2).mean()
        phi_loss = cfg.consistency_weight * cons + cfg.boundary_weight * bnd
        params = [p for p in self.nu.parameters() if p.requires_grad]
        grads = torch.autograd.grad(phi_loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                g = g / micro.n_micro
                p.grad = g if p.grad is None else p.grad + g
        if micro.last:
            torch.nn.utils.clip_grad_norm_(params, cfg.value_max_grad_norm)
            self.nu_opt.step()
            self.nu_opt.zero_grad(set_to_none=True)
        return {"consistency_loss": cons.item(), "boundary_loss": bnd.item(), "value_gate": self.nu.gate.item()}


def _times(t: Tensor, x: Tensor) -> Tensor:
    return torch.as_tensor(t).to(device=x.device, dtype=torch.float32).expand(x.shape[0])
