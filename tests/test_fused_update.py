"""Timestep-fused policy-gradient updates (``algorithms/_policy_gradient.py``): one forward/backward
over rows of (sample, step), each with its own ``t``, gives the gradient of per-timestep
accumulation -- written out here with scalar ``t`` the way the update was computed before fusion --
for Flow-GRPO, DanceGRPO and DDPO (PPO and REINFORCE) with CFG and KL on, with LoRA, and split over
two processes; and the step functions score per-row ``t`` as they score one ``t`` at a time."""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from diffalign import algorithms
from diffalign.algorithms._policy_gradient import gaussian_kl, ppo_loss, reinforce_loss
from diffalign.algorithms._rollout import Shard
from diffalign.core.parametrization import cond_index, guided_prediction
from diffalign.core.schedules import FlowSchedule, VPSchedule
from diffalign.core.steps import SAMPLERS
from diffalign.runtime.distributed import all_gather_cat
from diffalign.runtime.lora import Reference, apply_lora, lora_targets
from test_online_rl import tiny_model

PROMPTS = ["two red circles", "a blue square left of a green triangle"]
ATOL, RTOL = 1e-7, 1e-4


def brightness(images, prompts, meta=None):
    return images.mean(dim=(1, 2, 3))


def setup(method, kind, *, lora=False, **kw):
    model = tiny_model(kind)
    model.requires_grad_(False)
    if lora:
        torch.manual_seed(1)
        model = apply_lora(model, 4, 4, lora_targets(model))
    else:
        model.trainable_module().requires_grad_(True)
    cfg = algorithms.build_config(method, {"group_size": 4, "batch_size": 8, "num_steps": 4, "steps_per_epoch": 2,
                                           "guidance_scale": 3.0, **kw})
    reference = Reference(model) if cfg.beta > 0 else None
    return model, cfg, reference


def perturb(model, lora=False):
    """Move the trained weights off the sampling policy, so that ratios differ from 1, PPO clips some
    rows and the KL to the reference is positive."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((0.2 if lora else 0.02) * torch.randn(p.shape, generator=g))


def params(model):
    return [p for p in model.parameters() if p.requires_grad]


def take_grads(model):
    """Gradients of the trained parameters (zeros for LoRA layers outside the backbone, which prompt
    encoding reaches without gradient), then cleared."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params(model)]
    model.zero_grad(set_to_none=True)
    return grads


def per_step_gradient(algo, model, batch, chunk, steps):
    """The update of one optimiser step as accumulated before fusion: one call per timestep with a
    scalar ``t`` (and that step's noise level, stored next sample and advantages: step-level credit),
    each timestep's loss a mean over the chunk, averaged over the timesteps."""
    cfg, sched, ptype = algo.cfg, model.schedule, model.prediction_type
    stats = {"clip_frac": 0.0, "kl": 0.0}
    for j in steps:
        x_t, x_prev = batch.transition(chunk, j)
        t, t_prev = batch.t[j], batch.t[j + 1]
        tb = t.float().expand(len(chunk))
        cond, uncond = cond_index(batch.cond, chunk), cond_index(batch.uncond, chunk)
        kw = {"eta": batch.step_eta(j, cfg.eta), "prev_sample": x_prev, "schedule": sched, "prediction_type": ptype,
              **algo.step_kw}
        step = algo.step_fn(x_t, guided_prediction(model, x_t, tb, cond, uncond, cfg.guidance_scale), t, t_prev, **kw)
        adv = batch.advantage(chunk, j)
        if cfg.loss == "ppo":
            loss, s = ppo_loss(step.log_prob, batch.log_probs[chunk, j], adv, cfg.clip_range)
            stats["clip_frac"] += float(s["clip_frac"]) / len(steps)
        else:
            loss = reinforce_loss(step.log_prob, adv)
        if cfg.beta > 0:
            with torch.no_grad():
                ref = algo.reference(lambda m: algo.step_fn(
                    x_t, guided_prediction(m, x_t, tb, cond, uncond, cfg.guidance_scale), t, t_prev, **kw))
            kl = gaussian_kl(step.mean, ref.mean, step.std).mean()
            loss = loss + cfg.beta * kl
            stats["kl"] += float(kl.detach()) / len(steps)
        (loss / len(steps)).backward()
    return take_grads(model), stats


def fused_gradient(algo, model, micro_batches, scale=lambda m: 1.0):
    stats = {}
    k = len(micro_batches)
    for m in micro_batches:
        loss, s = algo.loss(model, m)
        (loss * scale(m) / k).backward()
        for key, v in s.items():
            stats.setdefault(key, []).append(float(v))
    return take_grads(model), {key: sum(v) / len(v) for key, v in stats.items()}


def assert_same_gradients(got, want):
    assert any(w.abs().max() > 0 for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL + RTOL * w.abs().max().item(), rtol=RTOL)


CASES = [("flow_grpo", "flow", {"beta": 0.04, "clip_range": 1e-2}),
         ("dance_grpo", "flow", {"beta": 0.04, "clip_range": 0.2, "timestep_fraction": 0.5}),
         # DDIM's last step (into t = 0) is deterministic and not trained: 3 steps, so one chunk of 8 samples
         ("ddpo", "epsilon", {"beta": 0.01, "clip_range": 1e-2, "clip_sample": 1.0, "steps_per_epoch": 1}),
         ("ddpo_sf", "epsilon", {"beta": 0.01, "clip_sample": 1.0, "steps_per_epoch": 1})]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method,kind,kw", CASES, ids=[c[0] for c in CASES])
def test_fused_rows_give_the_per_timestep_gradient(method, kind, kw, lora):
    model, cfg, reference = setup(method, kind, lora=lora, **kw)
    algo = algorithms.get(method)[1](cfg, reward=brightness, reference=reference)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=3)
    perturb(model, lora)
    model.train()
    n_steps = len(algo.train_steps(batch, torch.Generator()))
    chunk = len(batch) // cfg.steps_per_epoch
    n_rows = chunk * n_steps
    uneven = next(m for m in range(2, n_rows) if n_rows % math.ceil(n_rows / m))  # parts of two sizes
    for micro_batch_size in (chunk, uneven, n_rows):  # per step; fused in uneven parts; one fused pass
        algo.cfg.micro_batch_size = micro_batch_size
        plan = list(algo.minibatches(batch, torch.Generator().manual_seed(0)))
        assert len(plan) == cfg.steps_per_epoch
        first = plan[0]
        rows = sorted(zip(torch.cat([m.idx for m in first]).tolist(), torch.cat([m.steps for m in first]).tolist()))
        samples, trained = sorted({i for i, _ in rows}), sorted({j for _, j in rows})
        assert rows == sorted((i, j) for i in samples for j in trained)  # every sample of the chunk at every step
        assert len(samples) == chunk and len(trained) == n_steps
        want, ref_stats = per_step_gradient(algo, model, batch, torch.tensor(samples), trained)
        got, stats = fused_gradient(algo, model, first)
        assert_same_gradients(got, want)
        if micro_batch_size == n_rows:
            assert len(first) == 1
            if cfg.loss == "ppo":  # clipping statistics over the same rows
                assert 0 < stats["clip_frac"] < 1
                assert stats["clip_frac"] == pytest.approx(ref_stats["clip_frac"], abs=1e-6)
            assert stats["kl"] == pytest.approx(ref_stats["kl"], rel=1e-4) and stats["kl"] > 0
        elif micro_batch_size == chunk:
            assert len(first) == n_steps and all(len(set(m.steps.tolist())) == 1 for m in first)
        else:
            assert len({len(m.idx) for m in first}) == 2  # uneven: the micro-batch weights keep it exact


# step-level credit (algorithms/_step_credit.py): per-step advantages [N, T], per-step noise levels
# (DenseGRPO's calibrated a_j) and stored branch samples (G2RPO) reach every fused row
CREDIT = [("dense_grpo", {"beta": 0.04, "clip_range": 1e-2, "intermediate_reward": "tweedie"}),
          ("g2rpo", {"clip_range": 1e-2, "branch_window": [0, 3], "branches_per_epoch": 3, "granularities": [1, 2]})]


@pytest.mark.parametrize("method,kw", CREDIT, ids=[c[0] for c in CREDIT])
def test_fused_rows_carry_step_level_credit(method, kw):
    model, cfg, reference = setup(method, "flow", **kw)
    algo = algorithms.get(method)[1](cfg, reward=brightness, reference=reference)
    if method == "dense_grpo":
        algo.etas = [0.5, 0.9, 0.3, 1.2]  # as if calibrated: a different noise level at every step
    batch = algo.collect(model, PROMPTS, epoch=0, seed=3)
    assert batch.advantages.shape == (8, 4)
    if method == "dense_grpo":
        assert batch.eta.tolist() == pytest.approx([0.5, 0.9, 0.3, 1.2])
    else:
        assert batch.next_latents is not None
    perturb(model)
    model.train()
    n_steps = len(algo.train_steps(batch, torch.Generator()))
    n_rows = (len(batch) // cfg.steps_per_epoch) * n_steps
    algo.cfg.micro_batch_size = n_rows  # one fused pass over every step of the chunk
    first = next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0))))
    assert len(first) == 1 and len(first[0].steps.unique()) == n_steps > 1
    chunk = first[0].idx.unique()
    want, _ = per_step_gradient(algo, model, batch, chunk, sorted(set(first[0].steps.tolist())))
    got, _ = fused_gradient(algo, model, first)
    assert_same_gradients(got, want)


@pytest.mark.parametrize("sampler,schedule,ptype", [("ddim", VPSchedule("squaredcos_cap_v2"), "epsilon"),
                                                    ("flow_sde", FlowSchedule(shift=3.0), "flow"),
                                                    ("dance_sde", FlowSchedule(), "flow"),
                                                    ("cps", FlowSchedule(), "flow"),
                                                    ("flow_ode", FlowSchedule(), "flow")])
def test_step_functions_take_one_t_per_row(sampler, schedule, ptype):
    ts = schedule.timesteps(5)
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 3, 1, 4, 4, 2])
    x_t, out, x_prev = (torch.randn(len(rows), 2, 3, 3, generator=g) for _ in range(3))
    eta = 0.0 if sampler == "flow_ode" else 0.7 if sampler != "ddim" else 1.0
    kw = {"eta": eta, "schedule": schedule, "prediction_type": ptype}
    step = SAMPLERS[sampler]
    fused = step(x_t, out, ts[rows], ts[rows + 1], prev_sample=x_prev, **kw)
    for r, j in enumerate(rows.tolist()):
        one = step(x_t[r:r + 1], out[r:r + 1], ts[j], ts[j + 1], prev_sample=x_prev[r:r + 1], **kw)
        torch.testing.assert_close(fused.mean[r:r + 1], one.mean)
        torch.testing.assert_close(fused.log_prob[r:r + 1], one.log_prob)
        torch.testing.assert_close(fused.std.expand_as(fused.mean)[r:r + 1], one.std.expand_as(one.mean))


# ----- two processes (gloo): each keeps its rows of every fused micro-batch ----------------------------

TWO_PROC = ("flow_grpo", "flow", {"beta": 0.04, "clip_range": 1e-2})


def _worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        method, kind, kw = TWO_PROC
        model, cfg, reference = setup(method, kind, lora=True, micro_batch_size=10, **kw)
        algo = algorithms.get(method)[1](cfg, reward=brightness, reference=reference)
        algo.shard = Shard(rank, world, gather=all_gather_cat)
        batch = algo.collect(model, PROMPTS, epoch=0, seed=3)
        perturb(model, lora=True)
        model.train()
        first = next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0))))
        # the trainer's scaling: DDP averages the share * N-scaled losses into the one-process gradient
        grads, _ = fused_gradient(algo, model, first, scale=lambda m: m.share * world)
        for g in grads:
            dist.all_reduce(g)
            g /= world
        torch.save({"grads": grads, "shares": [m.share for m in first]}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_one_process_fused_gradient(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert any(0 < s < 1 for s in parts[0]["shares"])  # micro-batches straddle the processes
    method, kind, kw = TWO_PROC
    model, cfg, reference = setup(method, kind, lora=True, micro_batch_size=10, **kw)
    algo = algorithms.get(method)[1](cfg, reward=brightness, reference=reference)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=3)
    perturb(model, lora=True)
    model.train()
    first = next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0))))
    want, _ = per_step_gradient(algo, model, batch, torch.cat([m.idx for m in first]).unique(),
                                sorted(set(torch.cat([m.steps for m in first]).tolist())))
    for p in parts:  # each process sampled its rows of the one-process rollout, equal up to float rounding
        assert_same_gradients(p["grads"], want)
