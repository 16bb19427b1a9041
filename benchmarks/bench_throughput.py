"""Whole-epoch throughput of online RL against the raw per-timestep floor, measured in one process.

The floor is what a hand-written loop that calls the backbone once per timestep must spend on the
same model, batches and threads: the rollout's guided forwards (``T`` per sampling batch, CFG
doubling the batch) plus, per optimiser step, one forward+backward per trained timestep over the
step's samples (and one forward without gradient per timestep for a reference / old-policy term).
Raw calls only -- no sampler step, log-prob, loss, VAE, reward, optimiser or Python of a trainer.
diffalign's epoch is ``Trainer.train_epoch`` (rollout, decode, reward, advantages, every
micro-batch, clipping, AdamW, statistics). A ratio under 1 means the epoch beats the per-timestep
loop, which timestep fusion (one forward/backward over rows of sample x timestep) makes possible.

Cases:

- ``ddpo_sd``: DDPO on a tiny random SD 1.x pipeline (UNet2DConditionModel with block widths 16/32,
  one layer per block, CrossAttnDown + Down / Up + CrossAttnUp, cross-attention dim 32, sample size
  8; AutoencoderKL with blocks 8/8/16/16, 8x downsampling, 4 latent channels; a 2-layer CLIP text
  model of width 32; 64x64 images), DDIM 20 steps with eta 1, CFG 5, 16 images per epoch in 2
  sampling batches of 8, 4 optimiser steps of 4 samples over all 20 timesteps with the CFG pair,
  LoRA r4 on ``to_q/to_k/to_v/to_out.0``, fp32. Target: epoch <= 0.80 x floor.
- ``flow_grpo_shapes``: Flow-GRPO on ``shapes-flow`` as ``configs/flow_grpo_shapes.yaml`` trains
  it (64 images, 10 steps, CFG 3, KL 0.004, half the timesteps, full fine-tuning). Its per-timestep
  batch (64 samples, 128 with CFG) is already past the size where the model's cost per sample
  flattens, so the fused arm passes 128 rows (two timesteps) at a time, not all 320.
- ``nft_shapes``: DiffusionNFT on ``shapes-flow`` as ``configs/nft_shapes.yaml`` (128 images here).
- ``flow_grpo_sd3``: Flow-GRPO on the small random SD3 pipeline of ``tests/tiny_pipelines.py``
  (32x32 images, 16 per epoch, 10 steps, CFG 4.5, KL 0.04, LoRA r4, 2 optimiser steps).

Arms, alternated within every repeat: the floor; ``fused`` (this release: rows of sample x
timestep, ``micro_batch_size`` = rows of a whole optimiser step, LoRA merged for rollouts);
``fused-unmerged`` (LoRA cases: the same without merging); ``per-step`` (one forward/backward per
timestep, ``micro_batch_size`` = the step's samples, no merging: the update before fusion).

    make bench-throughput                                  # 2 threads, 5 repeats, every case
    python benchmarks/bench_throughput.py --quick          # 1 repeat on smaller settings (tested)
    python benchmarks/bench_throughput.py --row-costs      # cost of a row by rows per pass (micro_batch_size)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_pipelines import _finish, build_sd3, clip_text, clip_tokenizer  # noqa: E402

from diffalign.core.parametrization import cond_cat  # noqa: E402
from diffalign.runtime.trainer import Trainer, TrainConfig  # noqa: E402

SD_LORA_TARGETS = ["to_q", "to_k", "to_v", r"to_out\.0"]


def build_tiny_sd(path: Path) -> Path:
    """The tiny random SD 1.x pipeline of the DDPO comparison (module docstring), 64x64 images."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tok = clip_tokenizer()
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, sample_size=64)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip_text(tok), tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _finish(pipe, path, {"resolution": 64, "lora_target_modules": SD_LORA_TARGETS})


@dataclass
class Case:
    method: str
    algorithm: dict
    lora_rank: int = 0
    lr: float = 1e-4
    fused_rows: int | None = None  # micro_batch_size of the fused arms; None: every row of an optimiser step
    quick: dict = field(default_factory=dict)  # --quick overrides of `algorithm`


CASES = {
    "ddpo_sd": Case("ddpo", {"group_size": 2, "batch_size": 16, "sample_batch_size": 8, "num_steps": 20, "eta": 1.0,
                             "guidance_scale": 5.0, "steps_per_epoch": 4, "timestep_fraction": 1.0},
                    lora_rank=4, lr=3e-4, quick={"batch_size": 8, "sample_batch_size": 4, "num_steps": 4,
                                                 "steps_per_epoch": 2}),
    "flow_grpo_shapes": Case("flow_grpo", {"group_size": 8, "batch_size": 64, "num_steps": 10, "guidance_scale": 3.0,
                                           "eta": 0.7, "clip_range": 1e-3, "beta": 0.004, "timestep_fraction": 0.5},
                             fused_rows=128, quick={"group_size": 4, "batch_size": 8, "num_steps": 4}),
    "nft_shapes": Case("diffusion_nft", {"group_size": 8, "batch_size": 128, "sampler": "flow_ode", "num_steps": 10,
                                         "guidance_scale": 3.0, "train_guidance_scale": 1.0, "timesteps_per_sample": 2,
                                         "t_min": 0.6, "t_max": 1.0, "decay_slope": 0.001, "decay_max": 0.5,
                                         "steps_per_epoch": 2},
                       quick={"group_size": 4, "batch_size": 8, "num_steps": 4}),
    "flow_grpo_sd3": Case("flow_grpo", {"group_size": 4, "batch_size": 16, "num_steps": 10, "guidance_scale": 4.5,
                                        "beta": 0.04, "timestep_fraction": 1.0, "steps_per_epoch": 2},
                          lora_rank=4, lr=3e-4, quick={"batch_size": 8, "num_steps": 4}),
}


def model_for(name: str, workdir: Path, quick: bool) -> str:
    if name == "ddpo_sd":
        return str(build_tiny_sd(workdir / "tiny-sd"))
    if name == "flow_grpo_sd3":
        return str(build_sd3(workdir / "sd3", size="tiny" if quick else "small"))
    return "shapes-flow"


# ----- the update plan of each arm, and the floor's calls -----------------------------------------
def plan(algo: dict) -> dict:
    """Samples per optimiser step, trained timesteps (rows per sample) and the guidance doubling."""
    chunk = algo["batch_size"] // algo.get("steps_per_epoch", 1)
    if "timesteps_per_sample" in algo:  # the forward-process methods: K noise levels per sample
        per_sample, train_cfg = algo["timesteps_per_sample"], algo.get("train_guidance_scale", 1.0) != 1.0
    else:
        per_sample = max(1, round(algo.get("timestep_fraction", 1.0) * algo["num_steps"]))
        train_cfg = algo.get("guidance_scale", 1.0) != 1.0
    return {"chunk": chunk, "per_sample": per_sample, "train_cfg": train_cfg}


def arm_config(case: Case, algo: dict, model: str, arm: str, quick: bool = False) -> TrainConfig:
    p = plan(algo)
    rows = p["chunk"] * p["per_sample"] if quick or case.fused_rows is None else case.fused_rows
    micro = rows if arm.startswith("fused") else p["chunk"]
    return TrainConfig(model=model, method=case.method, reward="brightness", algorithm={**algo, "micro_batch_size": micro},
                       epochs=1000, lr=case.lr, lora_rank=case.lora_rank,
                       merge_lora_rollouts=arm in ("fused", "fused-compiled"), compile_backbone=arm == "fused-compiled",
                       checkpoint_every=1000, mixed_precision="no", device="cpu")


class Floor:
    """The raw backbone calls of one epoch at the arm's batch sizes (inputs built once, untimed)."""

    def __init__(self, trainer: Trainer, algo: dict):
        model = trainer._trainable_module()
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.diffusers = hasattr(self.base, "backbone")
        p = plan(algo)
        n, T = algo["batch_size"], algo["num_steps"]
        g = algo.get("guidance_scale", 1.0) != 1.0
        sb = min(n, algo.get("sample_batch_size", 64))
        self.sampling = (math.ceil(n / sb) * T, self.inputs(sb, g))
        extra = ("beta" in algo and algo["beta"] > 0) + ("timesteps_per_sample" in algo)  # reference / old policy
        self.training = (algo.get("steps_per_epoch", 1) * p["per_sample"], self.inputs(p["chunk"], p["train_cfg"]),
                         extra)

    def inputs(self, n: int, guided: bool):
        shape = tuple(self.base.sample_shape)
        prompts = ["two red circles"] * n  # a shapes-world prompt: every model's tokenizer reads it
        cond = self.base.encode_prompts(prompts)
        if guided:
            cond = cond_cat(cond, self.base.encode_prompts([""] * n))
        b = 2 * n if guided else n
        x, t = torch.randn(b, *shape), torch.rand(b).clamp(0.05, 0.95)
        if self.diffusers:  # the backbone's own keyword arguments, as the adapter builds them (untimed)
            with torch.no_grad():
                return x, self.base._inputs(x.to(self.base.compute_dtype), t, cond)
        return x, (t, cond)

    def call(self, inputs):
        x, kw = inputs
        if self.diffusers:
            return self.base.backbone(**kw, return_dict=False)[0]
        return self.base(x, *kw)

    def __call__(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        calls, inputs = self.sampling
        with torch.no_grad():
            for _ in range(calls):
                self.call(inputs)
        t1 = time.perf_counter()
        calls, inputs, extra = self.training
        for _ in range(calls):
            self.call(inputs).square().mean().backward()
            with torch.no_grad():
                for _ in range(extra):
                    self.call(inputs)
        self.base.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t1


def row_costs(name: str, args, workdir: Path, rows=(4, 8, 16, 32, 64, 128)) -> dict[int, float]:
    """CPU milliseconds of one row's forward+backward (guided: both CFG branches) when a pass holds
    ``rows`` rows: where it stops falling, a larger ``micro_batch_size`` gains nothing."""
    case = CASES[name]
    algo = {**case.algorithm, **(case.quick if args.quick else {})}
    trainer = Trainer(arm_config(case, algo, model_for(name, workdir, args.quick), "fused", args.quick),
                      workdir / f"{name}-rows", progress=False)
    floor = Floor(trainer, algo)
    out = {}
    for n in rows:
        inputs = floor.inputs(n, plan(algo)["train_cfg"])
        reps = max(2, 256 // n)
        floor.call(inputs).square().mean().backward()
        c0 = time.process_time()
        for _ in range(reps):
            floor.call(inputs).square().mean().backward()
        out[n] = round((time.process_time() - c0) / reps / n * 1e3, 3)
        floor.base.zero_grad(set_to_none=True)
    print(f"{name}: CPU ms per row forward+backward at rows per pass " + ", ".join(f"{n}: {v}" for n, v in out.items()))
    return out


# ----- one case -----------------------------------------------------------------------------------
def run_case(name: str, args, workdir: Path) -> dict:
    case = CASES[name]
    algo = {**case.algorithm, **(case.quick if args.quick else {})}
    model = model_for(name, workdir, args.quick)
    arms = ["fused", "fused-unmerged", "per-step"] if case.lora_rank else ["fused", "per-step"]
    arms += ["fused-compiled"] if args.compile else []
    trainers = {arm: Trainer(arm_config(case, algo, model, arm, args.quick), workdir / f"{name}-{arm}", progress=False)
                for arm in arms}
    floor = Floor(trainers["fused"], algo)
    times: dict[str, list[float]] = {a: [] for a in ["floor", *arms]}
    cpu: dict[str, list[float]] = {a: [] for a in times}
    split: dict[str, list[tuple[float, float]]] = {a: [] for a in times}
    warmup: dict[str, float] = {}
    for r in range(args.repeats + 1):  # repeat 0 warms up (and compiles)
        for arm in ["floor", *arms]:
            c0 = time.process_time()
            if arm == "floor":
                s, t = floor()
            else:
                t0 = time.perf_counter()
                row = trainers[arm].train_epoch(r)
                s, t = row["sample_s"], time.perf_counter() - t0 - row["sample_s"]
            if not r:
                warmup[arm] = s + t
            else:
                times[arm].append(s + t)
                cpu[arm].append(time.process_time() - c0)
                split[arm].append((s, t))
    n = algo["batch_size"]
    out = {"case": name, "method": case.method, "images": n, "repeats": args.repeats, "threads": torch.get_num_threads(),
           "plan": plan(algo), "arms": {}}
    f = statistics.median(times["floor"])
    for arm, ts in times.items():
        med = statistics.median(ts)
        ratios = [x / y for x, y in zip(ts, times["floor"])]
        out["arms"][arm] = {"epoch_s": round(med, 3), "min_s": round(min(ts), 3), "max_s": round(max(ts), 3),
                            "sample_s": round(statistics.median(s for s, _ in split[arm]), 3),
                            "train_s": round(statistics.median(t for _, t in split[arm]), 3),
                            "images_per_s": round(n / med, 2), "ratio": round(med / f, 3),
                            "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                            "warmup_s": round(warmup[arm], 2), "cpu_s": round(statistics.median(cpu[arm]), 3),
                            "cpu_ratio": round(statistics.median(cpu[arm]) / statistics.median(cpu["floor"]), 3)}
    return out


def report(rows: list[dict]) -> None:
    print(f"\n{'case':17} {'arm':15} {'epoch s':>8} {'[min, max]':>15} {'sample s':>8} {'train s':>8} "
          f"{'img/s':>7} {'x floor':>8} {'per-repeat x floor':>19} {'CPU s':>7} {'CPU x floor':>11}")
    for r in rows:
        for arm, a in r["arms"].items():
            rng = f"[{a['min_s']:.2f}, {a['max_s']:.2f}]"
            rr = "" if arm == "floor" else f"[{a['ratio_range'][0]:.2f}, {a['ratio_range'][1]:.2f}]"
            print(f"{r['case']:17} {arm:15} {a['epoch_s']:8.3f} {rng:>15} {a['sample_s']:8.3f} {a['train_s']:8.3f} "
                  f"{a['images_per_s']:7.2f} {a['ratio']:8.3f} {rr:>19} {a['cpu_s']:7.2f} {a['cpu_ratio']:11.3f}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per arm, after one warm-up epoch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 repeat on smaller settings (a smoke run)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--row-costs", action="store_true", help="only the cost of a row by rows per pass, per case")
    p.add_argument("--compile", action="store_true",
                   help="add a fused-compiled arm (compile_backbone; its warm-up epoch compiles, warmup_s)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    for lib in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(lib).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import diffusers
        import transformers

        for lib in (diffusers, transformers):
            lib.utils.logging.set_verbosity_error()
            lib.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} repeats (medians; A/B alternated)")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        if args.row_costs:
            return [{"case": name, "row_ms": row_costs(name, args, Path(d))} for name in args.cases]
        for name in args.cases:
            rows.append(run_case(name, args, Path(d)))
            report(rows[-1:])
    for r in rows:
        if "fused-compiled" in r["arms"]:
            a, b = r["arms"]["fused-compiled"], r["arms"]["fused"]
            gain = b["epoch_s"] - a["epoch_s"]
            print(f"{r['case']}: compiling took {a['warmup_s'] - b['warmup_s']:.1f} s more than a warm-up epoch, "
                  f"saves {gain:.3f} s per epoch" + (f": pays after {(a['warmup_s'] - b['warmup_s']) / gain:.0f} epochs"
                                                     if gain > 0 else ""))
    print("\nsummary (epoch / per-timestep floor, medians):")
    for r in rows:
        arms = r["arms"]
        line = ", ".join(f"{a} {v['ratio']:.2f}" for a, v in arms.items() if a != "floor")
        print(f"  {r['case']}: {line}; floor {arms['floor']['epoch_s']:.2f} s = "
              f"{r['images'] / arms['floor']['epoch_s']:.2f} images/s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
