"""The one training loop every alignment method runs in (``diffalign train``).

Per epoch: draw prompts, ``algorithm.collect`` (rollouts or data), then one optimiser step per
list of micro-batches that ``algorithm.minibatches`` plans, each micro-batch's loss from
``algorithm.loss``. Devices, mixed precision and multi-process training come from accelerate.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per
epoch), ``checkpoints/latest.pt`` (written atomically) and ``final/`` (a model directory that
every ``--model`` option accepts). Every random choice of an epoch is a function of
``(seed, epoch)``, so ``--resume`` continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import algorithms
from ..config import check_choice, check_positive, check_range, save_config, to_dict
from ..models import load_model
from .checkpoint import check_resumable, load_checkpoint, save_checkpoint
from .devices import resolve_device
from .ema import EMA
from .lora import Reference, apply_lora, is_lora, lora_targets
from .prompts import PromptSource, PromptsConfig


@dataclass
class TrainConfig:
    model: str = "shapes-flow"  # short name or model directory
    method: str = "flow_grpo"  # see `diffalign.algorithms.names()`
    reward: str = "shapes"  # registry name of the target reward
    reward_kwargs: dict = field(default_factory=dict)  # passed to rewards.get (e.g. path=...)
    heldout_rewards: list = field(default_factory=list)  # scored on the same samples, never optimised
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    algorithm: dict = field(default_factory=dict)  # method-specific fields (see the method's config class)
    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 0.0  # 0 = lora_rank
    ema_decay: float = 0.0  # 0 = no EMA; else the final model is the EMA
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | no | bf16
    checkpoint_every: int = 10  # epochs
    eval_every: int = 0  # epochs between held-out evaluations (0 = never during training)
    eval_prompts: int = 64  # held-out prompts per evaluation (ODE sampling, model defaults)
    log_with: str = "none"  # none | tensorboard | wandb (accelerate trackers)
    max_minutes: float = 0.0  # wall-clock training budget of one invocation; 0 = none (epochs decide)

    def __post_init__(self) -> None:
        check_choice("method", self.method, algorithms.names())
        for name in ("epochs", "checkpoint_every", "eval_prompts"):
            check_positive(name, getattr(self, name), integer=True)
        check_positive("lr", self.lr)
        check_range("weight_decay", self.weight_decay, 0, None)
        check_positive("max_grad_norm", self.max_grad_norm)
        check_range("lora_rank", self.lora_rank, 0, None, integer=True)
        check_range("lora_alpha", self.lora_alpha, 0, None)
        check_range("ema_decay", self.ema_decay, 0, 1, hi_open=True)
        check_range("eval_every", self.eval_every, 0, None, integer=True)
        check_choice("mixed_precision", self.mixed_precision, ["auto", "no", "bf16"])
        check_choice("log_with", self.log_with, ["none", "tensorboard", "wandb"])
        check_range("max_minutes", self.max_minutes, 0, None)
        algorithms.build_config(self.method, self.algorithm)  # validate the method's fields now


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**31 - 1)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False,
                 progress: bool = True):
        from accelerate import Accelerator

        from .. import rewards

        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        device = resolve_device(cfg.device)
        mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
        self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mp,
                                       log_with=None if cfg.log_with == "none" else cfg.log_with,
                                       project_dir=str(self.run_dir))
        self.algo_cfg = algorithms.build_config(cfg.method, cfg.algorithm)
        model = load_model(cfg.model, device=self.accelerator.device)
        model.requires_grad_(False)
        torch.manual_seed(cfg.seed)  # LoRA's random init is the only draw from the global generator
        if cfg.lora_rank:
            model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, lora_targets(model))
        else:
            # only the denoising backbone trains; text encoders (and VAEs) stay frozen, as in every real pipeline
            model.trainable_module().requires_grad_(True)
        self.reward = rewards.get(cfg.reward, **cfg.reward_kwargs)
        self.heldout = [rewards.get(name) for name in cfg.heldout_rewards]
        reference = Reference(model) if self.algo_cfg.beta > 0 else None
        _, algo_cls, _ = algorithms.get(cfg.method)
        self.algorithm = algo_cls(self.algo_cfg, reward=self.reward, reference=reference)
        self.params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, opt)
        self.ema = EMA(self._trainable_module(), cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.prompts = PromptSource(cfg.prompts)
        self.start_epoch = 0
        self.ckpt_path = self.run_dir / "checkpoints" / "latest.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._prepare_run_dir(resume, force)

    # ----- run directory, checkpoints ---------------------------------------------------------
    def _trainable_module(self):
        return self.accelerator.unwrap_model(self.model)

    def _trainable_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self._trainable_module().named_parameters() if v.requires_grad}

    def _prepare_run_dir(self, resume: bool, force: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg_file = self.run_dir / "config.yaml"
        if resume and self.ckpt_path.exists():
            state = load_checkpoint(self.ckpt_path, self.cfg, optimizer=self.optimizer, force=force)
            self._trainable_module().load_state_dict(state["trainable"], strict=False)
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if hasattr(self.algorithm, "load_state_dict"):
                self.algorithm.load_state_dict(state["algorithm"])
            self.start_epoch = state["step"]
            lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
            kept = [line for line in lines if json.loads(line)["epoch"] <= self.start_epoch]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
        elif resume and cfg_file.exists():
            from ..config import load_config

            check_resumable(to_dict(load_config(TrainConfig, cfg_file)), self.cfg, force=force)
        elif self.metrics_path.exists() and not resume:
            raise ValueError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose a new --run-dir")
        if self.accelerator.is_main_process:
            save_config(self.cfg, cfg_file)

    def save_checkpoint(self, epoch: int) -> None:
        if not self.accelerator.is_main_process:
            return
        extra = {"trainable": self._trainable_state()}
        if hasattr(self.algorithm, "state_dict"):
            extra["algorithm"] = self.algorithm.state_dict()
        save_checkpoint(self.ckpt_path, self.cfg, step=epoch, optimizer=self.optimizer, ema=self.ema, **extra)

    def save_final(self) -> Path:
        out = self.run_dir / "final"
        model = self._trainable_module()
        if self.ema is not None:
            self.ema.copy_to(model)
        if is_lora(model):
            model.save_pretrained(str(out / "lora"))  # the adapter alone, peft layout
            base = model.get_base_model()
            if hasattr(base, "save_lora"):  # diffusers pipelines: also the layout `pipe.load_lora_weights` reads
                base.save_lora(out / "lora")
            model = model.merge_and_unload()
        model.save_pretrained(out)
        return out

    # ----- the loop -----------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        cfg, acc = self.cfg, self.accelerator
        seed = epoch_seed(cfg.seed, epoch)
        prompts = self.prompts.sample(self.algo_cfg.prompts_per_epoch, seed)
        model = self._trainable_module()
        t0 = time.perf_counter()
        model.eval()
        with acc.autocast():
            batch = self.algorithm.collect(model, prompts, epoch=epoch, seed=seed)
        t_sample = time.perf_counter() - t0
        stats: dict[str, list[float]] = {}
        model.train()
        gen = torch.Generator().manual_seed(seed + 1)
        n_opt = 0
        for _ in range(self.algo_cfg.inner_epochs):
            for micro_batches in self.algorithm.minibatches(batch, gen):
                for micro in micro_batches:
                    with acc.autocast():
                        loss, s = self.algorithm.loss(self.model, micro)
                    acc.backward(loss / len(micro_batches))
                    for k, v in s.items():
                        stats.setdefault(k, []).append(v)
                grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                stats.setdefault("grad_norm", []).append(float(grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(model)
                n_opt += 1
        t_train = time.perf_counter() - t0 - t_sample
        row = {"epoch": epoch + 1, "images_seen": (epoch + 1) * len(batch), **batch.info,
               **{k: sum(v) / len(v) for k, v in stats.items()}, "lr": self.optimizer.param_groups[0]["lr"],
               "sample_s": round(t_sample, 3), "train_s": round(t_train, 3),
               "images_per_s": round(len(batch) / t_sample, 2)}
        for r in self.heldout:
            vals = torch.as_tensor(r(batch.images, batch.prompts)).float()
            row[f"heldout/{r.name}"] = vals[torch.isfinite(vals)].mean().item()
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
            row.update(self.evaluate_heldout())
        return row

    def evaluate_heldout(self) -> dict:
        """Exact verifier accuracy on held-out shapes prompts with the model's default (ODE) sampler."""
        from ..core.sampling import generate
        from ..worlds import shapes
        from .sampling import resolve_sampling

        model = self._trainable_module()
        model.eval()
        prompts = shapes.sample_prompts(self.cfg.eval_prompts, "heldout", seed=12345)
        with self.accelerator.autocast():
            images = generate(model, prompts, list(range(len(prompts))), **resolve_sampling(model))
        res = shapes.verify(images, prompts)
        return {"eval/heldout_accuracy": float(res.correct.mean()), "eval/heldout_score": float(res.score.mean())}

    def fit(self, stop_at: int | None = None) -> Path | None:
        """Train to ``cfg.epochs`` and save ``final/``; ``stop_at`` ends after that epoch with a
        checkpoint and no final model, as an interruption would (``--resume`` continues)."""
        cfg = self.cfg
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        if cfg.log_with != "none":
            self.accelerator.init_trackers(self.run_dir.name, config=to_dict(cfg))
        bar = Progress(TextColumn(f"{cfg.method}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TextColumn("reward {task.fields[reward]:.3f} kl {task.fields[kl]:.2e} "
                                  "clip {task.fields[clip]:.2f}"), TimeElapsedColumn(),
                       disable=not (self.progress and self.accelerator.is_main_process))
        t_start = time.time()
        with bar, self.metrics_path.open("a") as metrics:
            task = bar.add_task("train", total=cfg.epochs, completed=self.start_epoch, reward=float("nan"),
                                kl=0.0, clip=0.0)
            for epoch in range(self.start_epoch, cfg.epochs):
                row = self.train_epoch(epoch)
                row["elapsed_s"] = round(time.time() - t_start, 1)
                if self.accelerator.is_main_process:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if cfg.log_with != "none":
                    self.accelerator.log(row, step=epoch + 1)
                bar.update(task, advance=1, reward=row.get("reward_mean", float("nan")), kl=row.get("kl", 0.0),
                           clip=row.get("clip_frac", 0.0))
                out_of_time = cfg.max_minutes > 0 and time.time() - t_start >= 60 * cfg.max_minutes
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 in (cfg.epochs, stop_at) or out_of_time:
                    self.save_checkpoint(epoch + 1)
                if stop_at is not None and epoch + 1 >= stop_at:
                    break
                if out_of_time:  # the budget ends the run: the final model is this epoch's
                    bar.console.print(f"max_minutes={cfg.max_minutes} reached after {epoch + 1} epochs")
                    break
        if cfg.log_with != "none":
            self.accelerator.end_training()
        if stop_at is not None and stop_at < cfg.epochs:
            return None
        return self.save_final()


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False,
          progress: bool = True, stop_at: int | None = None) -> Path | None:
    """Fine-tune ``cfg.model`` with ``cfg.method``; returns the ``final`` model directory."""
    return Trainer(cfg, run_dir, resume=resume, force=force, progress=progress).fit(stop_at=stop_at)
