"""Pretraining of the shapes-world base models (``diffalign pretrain``).

Images are rendered on the fly from the world's *train* split, so the held-out prompt
combinations are never seen. Flow models learn the velocity ``eps - x0`` with SD3's
logit-normal time sampling (Esser et al. 2024); VP models learn ``eps`` with uniformly drawn
discrete steps (Ho et al. 2020). The prompt is dropped (replaced by the empty prompt) with
probability ``cfg_dropout`` so that classifier-free guidance works at sampling time.

Every batch is a pure function of ``(seed, step)``, and checkpoints hold the model, its EMA,
the optimiser and the step, so ``--resume`` continues a run exactly.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import check_choice, check_positive, check_range, save_config
from ..core.parametrization import from_x0_eps
from ..models.shapes_unet import ShapesDenoiser, default_config
from ..worlds import shapes
from .checkpoint import load_checkpoint, save_checkpoint
from .ema import EMA
from .lr import scheduled_lr


@dataclass
class PretrainConfig:
    model: str = "flow"  # "flow" (velocity, rectified flow) or "vp" (epsilon, cosine VP schedule, v-parametrised)
    steps: int = 6000  # optimiser steps
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200  # linear warm-up steps, then cosine decay to lr / 10
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    weights: str = "ema"  # which weights the model directory gets: the EMA ("ema") or the last step's ("raw")
    guidance_scale: float = 4.5  # the model's default CFG scale at sampling time (ShapesModelConfig)
    cfg_dropout: float = 0.1  # probability of training on the empty prompt
    relation_fraction: float = 0.5  # share of relation prompts in a batch
    # training-time distribution over t (docs/shapes.md, "Learning relations"): the base draw is
    # logit-normal(t_logit_mean, t_logit_std) for flow models (SD3, Esser et al. 2024) and uniform over the
    # discrete steps for VP models; a share t_high_fraction is drawn instead uniformly from [t_high_min, 1],
    # the noisy end where layout (and so every spatial relation) is decided
    t_logit_mean: float = 0.0
    t_logit_std: float = 1.0
    t_high_fraction: float = 0.5
    t_high_min: float = 0.6
    text_pos_std: float = 1.0  # init std of the text encoder's position embeddings (ShapesModelConfig)
    sequence_pool: bool = False  # FiLM also sees the whole token sequence (ShapesModelConfig)
    # role embeddings for the two objects of a relation prompt (ShapesModelConfig.role_words, the world's
    # relation words as the boundary); off in the v2 models
    text_roles: bool = False
    # "mention": role 1 = the object named first; "layout": role 1 = the object that goes left / up (the roles of
    # "right of" / "below" prompts exchanged): the XOR of relation word and mention order done in the tokenizer
    text_role_order: str = "mention"
    text_role_std: float = 0.0
    attn_pos_std: float = 0.02  # init std of the UNet's spatial position embeddings (ShapesModelConfig)
    init_from: str = ""  # a shapes model directory to continue from instead of a random init (same variant)
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        check_choice("model", self.model, ["flow", "vp"])
        check_positive("steps", self.steps, integer=True)
        check_positive("batch_size", self.batch_size, integer=True)
        check_positive("lr", self.lr)
        check_range("warmup", self.warmup, 0, None, integer=True)
        check_range("ema_decay", self.ema_decay, 0, 1, hi_open=True)
        check_choice("weights", self.weights, ["ema", "raw"])
        check_positive("guidance_scale", self.guidance_scale)
        check_range("cfg_dropout", self.cfg_dropout, 0, 1)
        check_range("relation_fraction", self.relation_fraction, 0, 1)
        check_positive("t_logit_std", self.t_logit_std)
        check_range("t_high_fraction", self.t_high_fraction, 0, 1)
        check_range("t_high_min", self.t_high_min, 0, 1, hi_open=True)
        check_positive("text_pos_std", self.text_pos_std)
        check_range("text_role_std", self.text_role_std, 0, None)
        check_choice("text_role_order", self.text_role_order, ["mention", "layout"])
        check_positive("attn_pos_std", self.attn_pos_std)
        if self.model == "vp" and (self.t_logit_mean, self.t_logit_std) != (0.0, 1.0):
            raise ValueError("t_logit_mean / t_logit_std apply to model 'flow' only (VP models draw discrete steps "
                             f"uniformly), got {self.t_logit_mean} / {self.t_logit_std} with model 'vp'")


EXPORT_FIELDS = ("weights", "guidance_scale", "log_every", "checkpoint_every")  # change nothing a checkpoint holds


def batch_for_step(cfg: PretrainConfig, step: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """The rendered images ([B,3,32,32] in [0,1]), their prompts, and the prompts the model sees."""
    seed = cfg.seed * 1_000_003 + step
    prompts = shapes.sample_prompts(cfg.batch_size, "train", seed=seed, relation_fraction=cfg.relation_fraction)
    images, _ = shapes.render_batch(prompts, seed=seed)
    rng = np.random.default_rng(seed)
    seen = ["" if rng.random() < cfg.cfg_dropout else p for p in prompts]
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, prompts, seen


def sample_t(cfg: PretrainConfig, model: ShapesDenoiser, B: int, generator: torch.Generator) -> torch.Tensor:
    """Training times ``[B]``: the base draw, a ``t_high_fraction`` share of it replaced by ``U[t_high_min, 1]``
    (for VP models: uniform over the discrete steps whose t is at least ``t_high_min``)."""
    flow = model.prediction_type == "flow"
    n = None if flow else model.schedule.num_train_timesteps
    if flow:
        t = torch.sigmoid(cfg.t_logit_mean + cfg.t_logit_std * torch.randn(B, generator=generator))
    else:
        t = model.schedule.timestep_to_t(torch.randint(0, n, (B,), generator=generator)).float()
    if cfg.t_high_fraction == 0:
        return t
    if flow:
        high = cfg.t_high_min + (1 - cfg.t_high_min) * torch.rand(B, generator=generator)
    else:
        k_min = min(n - 1, math.ceil(cfg.t_high_min * n - 1))  # the first k with (k + 1) / n >= t_high_min
        high = model.schedule.timestep_to_t(torch.randint(k_min, n, (B,), generator=generator)).float()
    return torch.where(torch.rand(B, generator=generator) < cfg.t_high_fraction, high, t)


def loss_fn(model: ShapesDenoiser, x0: torch.Tensor, cond, generator: torch.Generator,
            cfg: PretrainConfig | None = None) -> torch.Tensor:
    """The pretraining (denoising) loss: MSE between the prediction and its target at ``sample_t``'s times."""
    t = sample_t(cfg or PretrainConfig(model="flow" if model.prediction_type == "flow" else "vp"), model,
                 x0.shape[0], generator)
    eps = torch.randn(x0.shape, generator=generator)
    alpha, sigma = model.schedule.alpha_sigma(t.double())
    alpha, sigma = alpha.float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)
    x_t = alpha * x0 + sigma * eps
    if model.config.output_parametrization == "v":
        # epsilon model preconditioned through v: regress the UNet's raw output on v = alpha eps - sigma x0
        # (the eps-MSE weighted by 1 / alpha^2, which keeps the high-noise steps that fix layout in play)
        return torch.mean((model.unet(x_t, t, cond) - from_x0_eps(x0, eps, alpha, sigma, "v_prediction")) ** 2)
    target = from_x0_eps(x0, eps, alpha, sigma, model.prediction_type)
    return torch.mean((model(x_t, t, cond) - target) ** 2)


def init_model(cfg: PretrainConfig) -> ShapesDenoiser:
    """A random model of the variant, or ``init_from``'s weights; a layer that ``init_from`` lacks (the
    sequence pool, the role embeddings) starts at its own init (a no-op for the sequence pool and for
    zero-initialised roles)."""
    variant = "flow" if cfg.model == "flow" else "epsilon"
    swap = list(shapes.SECOND_FIRST_WORDS) if cfg.text_roles and cfg.text_role_order == "layout" else []
    roles = dict(role_words=list(shapes.RELATION_WORDS) if cfg.text_roles else [], text_role_std=cfg.text_role_std,
                 role_swap_words=swap)
    model_cfg = replace(default_config(variant, list(shapes.VOCAB)), text_pos_std=cfg.text_pos_std,
                        sequence_pool=cfg.sequence_pool, guidance_scale=cfg.guidance_scale,
                        attn_pos_std=cfg.attn_pos_std, **roles)
    if not cfg.init_from:
        return ShapesDenoiser(model_cfg)
    source = ShapesDenoiser.from_pretrained(cfg.init_from)
    if source.prediction_type != variant:
        raise ValueError(f"init_from={cfg.init_from!r} is a {source.prediction_type!r} model; model={cfg.model!r} "
                         f"needs {variant!r}")
    if source.config.role_words and not cfg.text_roles:
        raise ValueError(f"init_from={cfg.init_from!r} has role embeddings; set text_roles: true to continue it")
    if source.config.role_words and source.config.role_swap_words != swap:
        order = "layout" if source.config.role_swap_words else "mention"
        raise ValueError(f"init_from={cfg.init_from!r} numbers its roles in {order} order; set text_role_order: "
                         f"{order} to continue it (got {cfg.text_role_order!r})")
    if not source.config.role_words:
        source_roles = roles
    else:
        source_roles = dict(role_words=source.config.role_words, text_role_std=source.config.text_role_std,
                            role_swap_words=source.config.role_swap_words)
    model = ShapesDenoiser(replace(source.config, sequence_pool=cfg.sequence_pool or source.config.sequence_pool,
                                   guidance_scale=cfg.guidance_scale, **source_roles))
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    if unexpected or any(not k.startswith(("unet.seq_pool.", "text_encoder.role.")) for k in missing):
        raise ValueError(f"init_from={cfg.init_from!r} does not fit: missing {missing}, unexpected {unexpected}")
    return model.train()


def lr_at(cfg: PretrainConfig, step: int) -> float:
    return scheduled_lr(cfg.lr, step, cfg.steps - cfg.warmup, cfg.warmup)  # cosine to lr / 10


def pretrain(cfg: PretrainConfig, out: str | Path, *, resume: bool = False, force: bool = False,
             progress: bool = True, stop_at: int | None = None,
             on_step: Callable[[int, ShapesDenoiser, EMA], None] | None = None) -> ShapesDenoiser:
    """Train a shapes model from scratch; the EMA or raw weights (``cfg.weights``) are saved to ``out`` with
    ``save_pretrained``.

    ``stop_at`` ends this invocation after that step (with a checkpoint), as an interruption would;
    ``resume=True`` continues from the checkpoint. ``on_step(step, model, ema)`` is called after every
    optimiser step (``benchmarks/learnability.py`` evaluates the model there); it must leave the weights
    as it found them.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = init_model(cfg)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    start = 0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, cfg, model=model, optimizer=opt, ema=ema, force=force,
                                ignore=EXPORT_FIELDS)
        start = state["step"]
        generator.set_state(state["generator"])
    save_config(cfg, out / "pretrain_config.yaml")
    metrics_path = out / "metrics.jsonl"
    if start and metrics_path.exists():  # drop lines past the checkpoint: those steps are redone
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    metrics = metrics_path.open("a" if start else "w")
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("pretrain {task.fields[model]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), disable=not progress)
    t0, window = time.time(), []
    with bar:
        task = bar.add_task("pretrain", total=cfg.steps, completed=start, model=cfg.model, loss=float("nan"))
        model.train()
        for step in range(start, cfg.steps):
            images, _, seen = batch_for_step(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            loss = loss_fn(model, model.encode_images(images), model.encode_prompts(seen), generator, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema.update(model)
            if on_step is not None:
                on_step(step + 1, model, ema)
                model.train()
            window.append(loss.item())
            bar.update(task, advance=1, loss=sum(window) / len(window))
            if (step + 1) % cfg.log_every == 0:  # mean loss over the last log_every steps
                metrics.write(json.dumps({"step": step + 1, "loss": sum(window) / len(window), "lr": lr_at(cfg, step),
                                          "elapsed_s": round(time.time() - t0, 1)}) + "\n")
                metrics.flush()
                window = []
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 in (cfg.steps, stop_at):
                save_checkpoint(ckpt_path, cfg, step=step + 1, model=model, optimizer=opt, ema=ema,
                                generator=generator.get_state())
            if stop_at is not None and step + 1 >= stop_at:
                break
    metrics.close()
    if stop_at is not None and stop_at < cfg.steps:
        return model.eval()  # interrupted: only the checkpoint is written
    final = ShapesDenoiser(model.config)
    final.load_state_dict(model.state_dict())
    if cfg.weights == "ema":
        ema.copy_to(final)
    final.save_pretrained(out)
    return final.eval()
