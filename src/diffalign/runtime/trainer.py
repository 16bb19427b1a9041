"""The one training loop every alignment method runs in (``diffalign train``).

Per epoch: draw prompts, ``algorithm.collect`` (rollouts or data), then one optimiser step per
list of micro-batches that ``algorithm.minibatches`` plans, each micro-batch's loss from
``algorithm.loss``. Devices, mixed precision and multi-process training come from accelerate.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per
epoch), ``checkpoints/latest.pt`` (written atomically) and ``final/`` (a model directory that
every ``--model`` option accepts). Every random choice of an epoch is a function of
``(seed, epoch)``, so ``--resume`` continues exactly where an uninterrupted run would be.

Under ``accelerate launch`` with N processes (``runtime/distributed.py``, ``docs/distributed.md``)
the run keeps the one-process global batch: each process takes its share of every epoch, losses
are scaled so that the data-parallel gradient is the one-process gradient, metrics are reduced
over processes, and only the main process writes files.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import algorithms
from ..config import check_choice, check_positive, check_range, save_config, to_dict
from ..models import load_model
from .checkpoint import atomic_torch_save, check_resumable, load_checkpoint, save_checkpoint
from .devices import resolve_device
from .distributed import agree, all_reduce_sum, own_micro_batches, process_shard, reduce_stats
from .ema import EMA
from .lr import check_lr_schedule, lr_at
from .lora import Reference, apply_lora, is_lora, lora_targets, merged_lora
from .prompts import PromptSource, PromptsConfig


@dataclass
class TrainConfig:
    model: str = "shapes-flow"  # short name or model directory
    method: str = "flow_grpo"  # see `diffalign.algorithms.names()`
    reward: str = "shapes"  # registry name of the target reward
    reward_kwargs: dict = field(default_factory=dict)  # passed to rewards.get (e.g. path=...)
    heldout_rewards: list = field(default_factory=list)  # scored on the same samples, never optimised: names,
    # or {name: ..., **kwargs} (e.g. {name: temporal_consistency, path: DIR}; frames: min for image rewards on video)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    algorithm: dict = field(default_factory=dict)  # method-specific fields (see the method's config class)
    epochs: int = 100
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant | cosine | linear: the rate over the epochs (per epoch; resumes exactly)
    lr_warmup_epochs: int = 0  # linear warm-up from lr / warmup to lr over these first epochs
    lr_final: float = 0.1  # cosine / linear: the rate of the last epoch, as a fraction of lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 0.0  # 0 = lora_rank
    merge_lora_rollouts: bool = True  # LoRA: roll out with the adapter merged into the base weights (restored exactly)
    compile_backbone: bool = False  # torch.compile the backbone (compiles on the first epoch; docs/throughput.md)
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
        check_lr_schedule(self)
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
        for i, h in enumerate(self.heldout_rewards):
            if not (isinstance(h, str) or (isinstance(h, dict) and isinstance(h.get("name"), str))):
                raise ValueError(f"heldout_rewards[{i}] must be a reward name or a dict with a 'name' and the "
                                 f"reward's keyword arguments, got {h!r}")


def backbone_of(model: nn.Module) -> nn.Module:
    """The denoising backbone of a model (through peft's wrapper): diffusers' UNet / transformer, the
    shapes UNet."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, "backbone", None)  # diffusers: no upcast of a half-precision backbone
    return base.trainable_module() if backbone is None else backbone


def outside_backbone(model: nn.Module) -> list[nn.Module]:
    """The sub-modules of ``model`` beside the path down to its trainable backbone (the module
    ``trainable_module()`` names): text encoders, VAE. They never receive gradients (prompts are
    encoded and latents decoded without them), and FSDP leaves them whole on every process so they
    can run outside the sharded forward. Empty for a model that names no backbone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft (LoRA)
    backbone = base.trainable_module() if hasattr(base, "trainable_module") else None
    if backbone is None:
        return []
    out, stack = [], [model]
    while stack:
        for child in stack.pop().children():
            if child is backbone:
                continue
            if any(m is backbone for m in child.modules()):
                stack.append(child)
            elif any(True for _ in child.parameters()):
                out.append(child)
    return out


def check_process_count(cfg: TrainConfig, world: int) -> None:
    """Refuse a number of processes that the method's epoch cannot be split over evenly."""
    algo_cfg = algorithms.build_config(cfg.method, cfg.algorithm)
    if world > 1 and hasattr(algorithms.get(cfg.method)[1], "shard") and getattr(algo_cfg, "batch_size", 0) % world:
        raise ValueError(f"algorithm.batch_size={algo_cfg.batch_size} must be a multiple of the number of processes "
                         f"({world}): each process samples an equal share of the epoch")


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**31 - 1)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, force: bool = False,
                 progress: bool = True):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        from .. import rewards

        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        device = resolve_device(cfg.device)
        mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
        self._ddp_kwargs = DistributedDataParallelKwargs()  # read by `prepare`
        self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mp,
                                       log_with=None if cfg.log_with == "none" else cfg.log_with,
                                       project_dir=str(self.run_dir), kwargs_handlers=[self._ddp_kwargs])
        acc = self.accelerator
        self.algo_cfg = algorithms.build_config(cfg.method, cfg.algorithm)
        self.shard = process_shard(acc)
        self.sharded_state = acc.distributed_type.value in ("FSDP", "DEEPSPEED")  # parameters / optimiser state split
        if self.sharded_state and cfg.ema_decay > 0:
            raise ValueError(f"ema_decay={cfg.ema_decay} needs the whole model on every process; use DDP "
                             "(configs/accelerate/multi_gpu_ddp.yaml) or ema_decay=0 with FSDP / DeepSpeed")
        model = load_model(cfg.model, device=acc.device)
        model.requires_grad_(False)
        torch.manual_seed(cfg.seed)  # LoRA's random init is the only draw from the global generator
        if cfg.lora_rank:
            model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, lora_targets(model))
        else:
            # only the denoising backbone trains; text encoders (and VAEs) stay frozen, as in every real pipeline
            model.trainable_module().requires_grad_(True)
        self.reward = rewards.get(cfg.reward, **cfg.reward_kwargs)
        self.heldout = [rewards.get(h) if isinstance(h, str) else rewards.get(**h) for h in cfg.heldout_rewards]
        reference = Reference(model) if self.algo_cfg.beta > 0 else None
        if cfg.compile_backbone:  # in place (names, LoRA, checkpoints unchanged); after the reference's copy
            backbone_of(model).compile()
        _, algo_cls, _ = algorithms.get(cfg.method)
        self.algorithm = algo_cls(self.algo_cfg, reward=self.reward, reference=reference)
        # how N processes share an epoch (runtime/distributed.py): an algorithm with a `shard` samples
        # its own part; one whose loss has no side effects declares `spread_micro_batches`; any
        # other runs whole on every process
        self.work_split = ("shard" if hasattr(self.algorithm, "shard") else
                           "spread" if getattr(self.algorithm, "spread_micro_batches", False) else "replicate")
        self.shards_data = self.work_split == "shard"
        if self.shard.world > 1 and self.work_split == "replicate" and acc.is_main_process:
            warnings.warn(f"{cfg.method} does not split its work over processes: each of the {self.shard.world} "
                          "processes computes the whole epoch (the same result as one process, no speed-up)")
        check_process_count(cfg, self.shard.world)
        if self.shards_data:
            self.algorithm.shard = self.shard
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.trainable_names = [k for k, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.prompts = PromptSource(cfg.prompts)
        self.start_epoch = 0
        self.ckpt_path = self.run_dir / "checkpoints" / "latest.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        state = self._check_run_dir(resume, force)
        if state is not None:  # weights go in before `prepare`, which may shard them (FSDP)
            model.load_state_dict(state["trainable"], strict=False)
        self._configure_sharding(model)
        # DDP fails on trainable parameters that never receive a gradient unless told: LoRA adapters
        # that a model's target names put outside the backbone (prompts are encoded without gradients)
        self._ddp_kwargs.find_unused_parameters = any(p.requires_grad for m in outside_backbone(model)
                                                      for p in m.parameters())
        self.model, self.optimizer = acc.prepare(model, opt)
        if self.sharded_state and reference is not None and reference.frozen is None:
            reference.model = self.model  # LoRA: the adapter-disabled forward must run through FSDP
        self.ema = EMA(self._trainable_module(), cfg.ema_decay) if cfg.ema_decay > 0 else None
        if state is not None:
            self._restore(state)
        if acc.is_main_process:
            self._write_run_dir(state is not None)

    # ----- run directory, checkpoints ---------------------------------------------------------
    def _trainable_module(self):
        return self.accelerator.unwrap_model(self.model)

    def _policy(self):
        """The model that samples: the unwrapped model, or under FSDP the sharded one (whose forward
        gathers the weights it needs)."""
        return self.model if self.accelerator.distributed_type.value == "FSDP" else self._trainable_module()

    def _rollout_weights(self, model):
        """LoRA merged into the base weights while the algorithm samples with the policy itself
        (not under FSDP / DeepSpeed, whose parameters are split or flattened)."""
        merge = (self.cfg.lora_rank and self.cfg.merge_lora_rollouts and not self.sharded_state
                 and getattr(self.algorithm, "samples_with_policy", False))
        return merged_lora(model) if merge else contextlib.nullcontext()

    def _accumulating(self, last: bool):
        """N processes: gradients of all but an optimiser step's last micro-batch stay local; the
        last backward pass synchronises them (and DeepSpeed steps at that boundary)."""
        if self.shard.world == 1:
            return contextlib.nullcontext()
        self.accelerator.sync_gradients = last
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def _trainable_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self._trainable_module().named_parameters() if v.requires_grad}

    def _check_run_dir(self, resume: bool, force: bool) -> dict | None:
        """Validate the run directory (every process) and return the checkpoint to resume from."""
        cfg_file = self.run_dir / "config.yaml"
        state = None
        if resume and self.ckpt_path.exists():
            state = load_checkpoint(self.ckpt_path, self.cfg, force=force)
        elif resume and cfg_file.exists():
            from ..config import load_config

            check_resumable(to_dict(load_config(TrainConfig, cfg_file)), self.cfg, force=force)
        elif self.metrics_path.exists() and not resume:
            raise ValueError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose a new --run-dir")
        self.accelerator.wait_for_everyone()  # every process has looked before the main process writes
        return state

    def _restore(self, state: dict) -> None:
        """Optimiser, EMA and algorithm state of a checkpoint (the weights are loaded before ``prepare``)."""
        if state.get("optimizer_shards"):  # FSDP / DeepSpeed: one optimiser file per process
            if state["optimizer_shards"] != self.shard.world:
                raise ValueError(f"cannot resume: the checkpoint's optimiser state is split over "
                                 f"{state['optimizer_shards']} processes (FSDP / DeepSpeed); resume with "
                                 f"--num-processes {state['optimizer_shards']}")
            shard = torch.load(self._optimizer_shard_path(), map_location="cpu", weights_only=False)
            if shard["step"] != state["step"]:
                raise ValueError(f"cannot resume: {self._optimizer_shard_path()} is from epoch {shard['step']}, "
                                 f"the checkpoint from epoch {state['step']}")
            self.optimizer.load_state_dict(shard["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if hasattr(self.algorithm, "load_state_dict"):
            self.algorithm.load_state_dict(state["algorithm"])
        self.start_epoch = state["step"]

    def _write_run_dir(self, resumed: bool) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resumed:  # metrics past the checkpoint are redone
            lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
            kept = [line for line in lines if json.loads(line)["epoch"] <= self.start_epoch]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
        save_config(self.cfg, self.run_dir / "config.yaml")

    def _optimizer_shard_path(self) -> Path:
        return self.ckpt_path.with_name(f"optimizer.rank{self.shard.rank}.pt")

    def _configure_sharding(self, model) -> None:
        """FSDP / DeepSpeed settings that depend on the model and the config, set before ``prepare``."""
        state = self.accelerator.state
        if state.distributed_type.value == "FSDP":
            plugin = state.fsdp_plugin
            # only the backbone is sharded: text encoders and VAE run outside its forward
            plugin.ignored_modules = outside_backbone(model)
            names = plugin.transformer_cls_names_to_wrap
            if names:  # one config serves SD3 and FLUX: wrap the listed block classes this model has
                present = {type(m).__name__ for m in model.modules()}
                if not any(n in present for n in names):
                    raise ValueError(f"FSDP: the model has none of the block classes {list(names)} of the accelerate "
                                     "config's fsdp_transformer_layer_cls_to_wrap; name its transformer block class "
                                     "there")
                plugin.transformer_cls_names_to_wrap = [n for n in names if n in present]
        elif state.distributed_type.value == "DEEPSPEED":
            ds = state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # only DeepSpeed's logging reads it
                ds["train_micro_batch_size_per_gpu"] = getattr(self.algo_cfg, "micro_batch_size", 1)
            if ds.get("gradient_clipping", "auto") == "auto":
                ds["gradient_clipping"] = self.cfg.max_grad_norm
            elif float(ds["gradient_clipping"]) != self.cfg.max_grad_norm:
                raise ValueError(f"the DeepSpeed config clips gradients at {ds['gradient_clipping']} but "
                                 f"max_grad_norm={self.cfg.max_grad_norm}; set gradient_clipping: auto")
            if ds.get("gradient_accumulation_steps", 1) not in (1, "auto"):
                raise ValueError("the DeepSpeed config must keep gradient_accumulation_steps at 1 (or auto): "
                                 "diffalign accumulates the micro-batches of each optimiser step itself")

    def save_checkpoint(self, epoch: int) -> None:
        """Written by the main process, atomically; with FSDP / DeepSpeed every process must call it
        (the weights are gathered, and each process writes its part of the optimiser state first)."""
        acc = self.accelerator
        if self.sharded_state:
            full = acc.get_state_dict(self.model)
            atomic_torch_save({"step": epoch, "optimizer": self.optimizer.state_dict()}, self._optimizer_shard_path())
            acc.wait_for_everyone()  # every optimiser part is on disk before latest.pt names this epoch
        if not acc.is_main_process:
            return
        if self.sharded_state:
            names = set(self.trainable_names)
            extra = {"trainable": {k: v.detach().cpu() for k, v in full.items() if k in names},
                     "optimizer_shards": self.shard.world}
        else:
            extra = {"trainable": self._trainable_state()}
        if hasattr(self.algorithm, "state_dict"):
            extra["algorithm"] = self.algorithm.state_dict()
        save_checkpoint(self.ckpt_path, self.cfg, step=epoch, optimizer=None if self.sharded_state else self.optimizer,
                        ema=self.ema, **extra)

    def save_final(self) -> Path:
        """The final model directory, written by the main process (every process must call it)."""
        out, acc = self.run_dir / "final", self.accelerator
        full = acc.get_state_dict(self.model) if self.sharded_state else None  # a collective: every process
        if acc.is_main_process:
            if full is None:
                model = self._trainable_module()
            else:  # a fresh copy of the model on the main process takes the gathered weights
                model = load_model(self.cfg.model)
                if self.cfg.lora_rank:
                    model = apply_lora(model, self.cfg.lora_rank, self.cfg.lora_alpha, lora_targets(model))
                model.load_state_dict(full, strict=False)
            if self.ema is not None:
                self.ema.copy_to(model)
            if is_lora(model):
                model.save_pretrained(str(out / "lora"))  # the adapter alone, peft layout
                base = model.get_base_model()
                if hasattr(base, "save_lora"):  # diffusers pipelines: also the layout `pipe.load_lora_weights` reads
                    base.save_lora(out / "lora")
                model = model.merge_and_unload()
            model.save_pretrained(out)
        acc.wait_for_everyone()  # every process returns a finished directory
        return out

    # ----- the loop -----------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        cfg, acc = self.cfg, self.accelerator
        seed = epoch_seed(cfg.seed, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        prompts = self.prompts.sample(self.algo_cfg.prompts_per_epoch, seed)
        model = self._policy()
        world = self.shard.world
        t0 = time.perf_counter()
        model.eval()
        with acc.autocast(), self._rollout_weights(model):
            batch = self.algorithm.collect(model, prompts, epoch=epoch, seed=seed)
        t_sample = time.perf_counter() - t0
        stats: dict[str, list[tuple[float, float]]] = {}  # (value, share) per micro-batch
        model.train()
        gen = torch.Generator().manual_seed(seed + 1)
        for _ in range(self.algo_cfg.inner_epochs):
            for micro_batches in self.algorithm.minibatches(batch, gen):
                k = len(micro_batches)
                mine = own_micro_batches(micro_batches, self.shard, self.work_split)
                for i, (micro, share) in enumerate(mine):
                    with self._accumulating(last=i == len(mine) - 1):
                        with acc.autocast():
                            loss, s = self.algorithm.loss(self.model, micro)
                        # N processes: the data-parallel mean of share * N / k-scaled losses is the one-process gradient
                        acc.backward(loss / k if world == 1 else loss * (share * world / k))
                    for key, v in s.items():
                        stats.setdefault(key, []).append((v, share))
                grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                if grad_norm is not None:  # the same on every process: counted once (read at the epoch's end)
                    stats.setdefault("grad_norm", []).append((grad_norm, float(self.shard.rank == 0)))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self._trainable_module())
        t_train = time.perf_counter() - t0 - t_sample
        n = len(batch) * (world if self.shards_data else 1)  # images of the whole epoch
        row = {"epoch": epoch + 1, "images_seen": (epoch + 1) * n, **batch.info,
               **reduce_stats(stats, world, acc.device), "lr": self.optimizer.param_groups[0]["lr"],
               "sample_s": round(t_sample, 3), "train_s": round(t_train, 3),
               "images_per_s": round(n / t_sample, 2)}
        for r in self.heldout:
            vals = torch.as_tensor(r(batch.images, batch.prompts)).float()
            if self.shards_data:
                vals = self.shard.all(vals)
            row[f"heldout/{r.name}"] = vals[torch.isfinite(vals)].mean().item()
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
            row.update(self.evaluate_heldout())
        return row

    def evaluate_heldout(self) -> dict:
        """Exact verifier accuracy on held-out shapes prompts with the model's default (ODE) sampler
        (of the EMA weights when ``ema_decay`` > 0)."""
        with self._ema_weights():
            return self._evaluate_heldout()

    @contextlib.contextmanager
    def _ema_weights(self):
        """With EMA on, the EMA weights (what ``final/`` will hold) stand in for the trained ones."""
        if self.ema is None:
            yield
            return
        module = self._trainable_module()
        saved = {k: v.detach().clone() for k, v in module.state_dict().items() if k in self.ema.shadow}
        self.ema.copy_to(module)
        try:
            yield
        finally:
            module.load_state_dict(saved, strict=False)

    def _evaluate_heldout(self) -> dict:
        from ..core.sampling import generate
        from ..worlds import shapes
        from .sampling import resolve_sampling

        model = self._policy()
        model.eval()
        n, rank, world = self.cfg.eval_prompts, self.shard.rank, self.shard.world
        prompts = shapes.sample_prompts(n, "heldout", seed=12345)
        lo, hi = rank * n // world, (rank + 1) * n // world  # N processes: each evaluates a contiguous share
        if hi > lo:
            with self.accelerator.autocast():
                images = generate(model, prompts[lo:hi], list(range(lo, hi)), **resolve_sampling(model))
            res = shapes.verify(images, prompts[lo:hi])
            is_rel = np.array([shapes.parse(p).kind == "relation" for p in prompts[lo:hi]], bool)
        # sums over this process's prompts: correct, score, relation prompts and their correct, count likewise
        own = ([float(res.correct.sum()), float(res.score.sum()), float(is_rel.sum()),
                float(res.correct[is_rel].sum()), float((~is_rel).sum()), float(res.correct[~is_rel].sum())]
               if hi > lo else [0.0] * 6)
        correct, score, n_rel, rel, n_count, count = own if world == 1 else all_reduce_sum(own, self.accelerator.device)
        out = {"eval/heldout_accuracy": correct / n, "eval/heldout_score": score / n}
        if n_rel:
            out["eval/heldout_relation"] = rel / n_rel
        if n_count:
            out["eval/heldout_count"] = count / n_count
        return out

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
        main = self.accelerator.is_main_process
        with bar, (self.metrics_path.open("a") if main else contextlib.nullcontext()) as metrics:
            task = bar.add_task("train", total=cfg.epochs, completed=self.start_epoch, reward=float("nan"),
                                kl=0.0, clip=0.0)
            for epoch in range(self.start_epoch, cfg.epochs):
                row = self.train_epoch(epoch)
                row["elapsed_s"] = round(time.time() - t_start, 1)
                if main:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if cfg.log_with != "none":
                    self.accelerator.log(row, step=epoch + 1)
                bar.update(task, advance=1, reward=row.get("reward_mean", float("nan")), kl=row.get("kl", 0.0),
                           clip=row.get("clip_frac", 0.0))
                out_of_time = agree(cfg.max_minutes > 0 and time.time() - t_start >= 60 * cfg.max_minutes,
                                    self.shard.world, self.accelerator.device)  # every process stops together
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
