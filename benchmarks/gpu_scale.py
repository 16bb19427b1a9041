"""The shapes-world methods at GPU batch sizes, several runs side by side on one GPU.

On 2 CPU cores an online run sees a few thousand images in 15 minutes, and the gradient of one
64-image epoch is mostly noise (``benchmarks/grad_snr.py``). This script asks what the same
configs do with 8x the batch and ~10-50x the images: every run is ``diffalign train
configs/<config>.yaml`` with the batch scaled (``--scale``), a wall-clock budget
(``max_minutes``), and the trainer's held-out evaluation (exact verifier accuracy, ODE sampling,
``--eval-prompts`` held-out prompts) every ``--eval-every`` epochs. The runs are separate
processes sharing the GPU (a 2.4M-parameter UNet leaves it mostly idle), one CPU thread each.

Before the runs, one process checks the CUDA path of every shipped shapes config (two epochs in
bf16 autocast: finite loss, parameters moved, peak memory) and evaluates both base models on the
same held-out prompts; its lines start with ``smoke``.

    python benchmarks/gpu_scale.py --minutes 5 --out runs/gpu-scale        # a GPU machine
    python benchmarks/gpu_scale.py --tiny --out /tmp/gpu-scale             # CPU smoke of the script

Writes ``summary.json`` (every run's curve) and each run's directory under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (config, overrides, [scale-1 batch fields]); the batch fields of the config (or of the
# third element, which pins what was measured when the shipped config has moved on) are
# multiplied by --scale; the overrides apply after that
_NFT64, _CRD64 = {"batch_size": 64}, {"batch_size": 64, "micro_batch_size": 32}  # measured at 8 x these
RUNS = {
    "flow_grpo": ("flow_grpo_shapes", {}),
    "flow_grpo_demo": ("demo_flow_grpo", {}),
    "dance_grpo": ("dance_grpo_shapes", {}),
    "diffusion_nft": ("nft_shapes", {"lr": 3e-4}, _NFT64),
    "awm": ("awm_shapes", {}),
    "crd": ("crd_shapes", {"lr": 3e-4}, _CRD64),
    "dpo": ("dpo_shapes", {"algorithm.source": "reference", "algorithm.data": ""}),
    "draft": ("draft_shapes", {}),
    "vgg_flow": ("vgg_flow_shapes", {}),
    # learning-rate variants (lr 3e-4 collapsed NFT and CRD at 8x batch, left GRPO flat)
    "diffusion_nft_lr1e-4": ("nft_shapes", {"lr": 1e-4}, _NFT64),
    "diffusion_nft_lr3e-5": ("nft_shapes", {"lr": 3e-5}, _NFT64),
    "awm_lr3e-4": ("awm_shapes", {"lr": 3e-4}),
    "flow_grpo_lr3e-4": ("flow_grpo_shapes", {"lr": 3e-4}),
    "crd_lr1e-4": ("crd_shapes", {"lr": 1e-4}, _CRD64),
    # Flow-GRPO with the 8x rollout split into 8 PPO minibatches (8 optimiser steps per epoch)
    "flow_grpo_spe8": ("flow_grpo_shapes", {"algorithm.steps_per_epoch": 8, "algorithm.micro_batch_size": 256}),
    "flow_grpo_spe8_lr3e-5": ("flow_grpo_shapes", {"lr": 3e-5, "algorithm.steps_per_epoch": 8,
                                                  "algorithm.micro_batch_size": 256}),
}
DEFAULT_RUNS = ("flow_grpo", "flow_grpo_demo", "dance_grpo", "diffusion_nft", "awm", "crd", "dpo", "draft", "vgg_flow")
BATCH_FIELDS = ("batch_size", "pairs_per_epoch", "micro_batch_size")
# files the smoke pass cannot run as shipped (they read pairs from disk): the same override as above
SMOKE_OVERRIDES = {"dpo_shapes": {"algorithm.source": "reference", "algorithm.data": ""},
                   "kto_shapes": {"algorithm.source": "reference", "algorithm.data": ""},
                   "mapo_shapes": {"algorithm.source": "policy", "algorithm.data": ""},
                   "npo_shapes": {"algorithm.source": "reference", "algorithm.data": ""}}


def _overrides(config: str, extra: dict, scale: int, base: dict | None = None) -> list[str]:
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())
    algo = {**raw.get("algorithm", {}), **(base or {})}
    out = {f"algorithm.{k}": algo[k] * scale for k in BATCH_FIELDS if k in algo}
    out.update(extra)
    return _args(out)


def _args(over: dict) -> list[str]:
    """Dotted ``key=value`` overrides; an empty string is written as ``""`` (YAML would read null)."""
    return [f"{k}={json.dumps(v) if v == '' else v}" for k, v in over.items()]


def smoke(args: argparse.Namespace) -> None:
    """Two epochs of every shapes config on this device, then both base models' held-out accuracy."""
    import torch

    from diffalign.config import load_config
    from diffalign.runtime.trainer import TrainConfig, Trainer

    out = Path(args.out) / "smoke"
    configs = sorted(p.stem for p in (ROOT / "configs").glob("*_shapes.yaml"))
    if args.tiny:
        configs = configs[:3]
    for name in configs:
        t0 = time.time()
        over = {"epochs": 2, "checkpoint_every": 2, "eval_every": 0, "max_minutes": 0, "heldout_rewards": "[]",
                **SMOKE_OVERRIDES.get(name, {})}
        try:
            cfg = load_config(TrainConfig, ROOT / "configs" / f"{name}.yaml", _args(over))
            trainer = Trainer(cfg, out / name, progress=False)
            params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
            before = [p.detach().float().clone() for p in params]
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            trainer.fit()
            after = [p.detach().float() for p in params]
            moved = max((a - b).abs().max().item() for a, b in zip(after, before))
            rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
            loss = [r.get("loss", float("nan")) for r in rows]
            mem = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
            ok = all(math.isfinite(x) for x in loss) and moved > 0
            print(f"smoke {name:24s} {'ok  ' if ok else 'FAIL'} device {trainer.accelerator.device} "
                  f"loss {loss} max|dparam| {moved:.2e} peak {mem:.0f} MiB {time.time() - t0:.1f}s", flush=True)
        except Exception:  # noqa: BLE001 -- report and go on: one broken config must not hide the others
            print(f"smoke {name:24s} ERROR\n" + traceback.format_exc(), flush=True)
    for model in ("shapes-flow", "shapes-vp"):
        cfg = load_config(TrainConfig, None, [f"model={model}", "method=flow_grpo" if model == "shapes-flow"
                                              else "method=ddpo", f"eval_prompts={args.eval_prompts}"])
        acc = Trainer(cfg, out / f"base-{model}", progress=False).evaluate_heldout()
        print(f"smoke base {model} held-out accuracy {acc['eval/heldout_accuracy']:.3f} "
              f"score {acc['eval/heldout_score']:.3f} ({args.eval_prompts} prompts)", flush=True)


def curve(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    evals = [{"epoch": r["epoch"], "images": r["images_seen"], "elapsed_s": r["elapsed_s"],
              "acc": r["eval/heldout_accuracy"], "score": r["eval/heldout_score"],
              "reward": r.get("reward_mean")} for r in rows if "eval/heldout_accuracy" in r]
    return {"epochs": len(rows), "images": rows[-1].get("images_seen") if rows else 0,
            "elapsed_s": rows[-1]["elapsed_s"] if rows else 0,
            "reward_first": rows[0].get("reward_mean") if rows else None,
            "reward_last": rows[-1].get("reward_mean") if rows else None, "evals": evals}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="comma-separated subset of " + ",".join(RUNS))
    p.add_argument("--minutes", type=float, default=5.0, help="training budget of each run")
    p.add_argument("--scale", type=int, default=8, help="batch multiplier over the shipped config")
    p.add_argument("--eval-every", type=int, default=10, help="epochs between held-out evaluations")
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--out", default="runs/gpu-scale")
    p.add_argument("--tiny", action="store_true", help="CPU smoke of this script: small batches, short runs")
    p.add_argument("--smoke-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-smoke", action="store_true")
    p.add_argument("--pack", default="", help="also write runs.tgz (logs, metrics, configs) and the final "
                   "weights of the three runs with the best last evaluation into this directory")
    args = p.parse_args()
    if args.tiny:
        args.minutes, args.scale, args.eval_every, args.eval_prompts = 0.1, 1, 1, 8
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"--runs: unknown run(s) {unknown}; known: {', '.join(RUNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke_only:
        smoke(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs, logs = {}, []

    def _log(path: Path):
        logs.append(path.open("w"))
        return logs[-1]

    if not args.no_smoke:
        cmd = [sys.executable, __file__, "--smoke-only", "--out", str(out), "--eval-prompts", str(args.eval_prompts)]
        procs["smoke"] = subprocess.Popen(cmd + ["--tiny"] * args.tiny, env=env, stdout=_log(out / "smoke.log"),
                                          stderr=subprocess.STDOUT)
    for name in names:
        config, extra, *base = RUNS[name]
        over = _overrides(config, extra, args.scale, *base)
        over += ["epochs=1000000", "checkpoint_every=1000000", f"max_minutes={args.minutes}",
                 f"eval_every={args.eval_every}", f"eval_prompts={args.eval_prompts}", "heldout_rewards=[]"]
        cmd = [sys.executable, "-m", "diffalign", "train", str(ROOT / "configs" / f"{config}.yaml"), *over,
               "--run-dir", str(out / name)]
        (out / f"{name}.cmd").write_text(" ".join(cmd) + "\n")
        procs[name] = subprocess.Popen(cmd, env=env, stdout=_log(out / f"{name}.log"), stderr=subprocess.STDOUT)
    t0 = time.time()
    status = {name: proc.wait() for name, proc in procs.items()}
    for f in logs:
        f.close()
    print(f"all runs ended after {time.time() - t0:.0f}s; exit status {status}")
    if "smoke" in procs:
        print((out / "smoke.log").read_text())
    summary = {"scale": args.scale, "minutes": args.minutes, "eval_prompts": args.eval_prompts, "runs": {}}
    print(f"{'run':16s} {'epochs':>6s} {'images':>8s} {'reward first->last':>19s}  held-out accuracy by images seen")
    for name in names:
        c = curve(out / name)
        c["status"] = status[name]
        summary["runs"][name] = c
        rf, rl = c["reward_first"], c["reward_last"]
        accs = " ".join(f"{e['images']}:{e['acc']:.3f}" for e in c["evals"])
        print(f"{name:16s} {c['epochs']:6d} {c['images'] or 0:8d} "
              f"{(rf or float('nan')):8.3f} -> {(rl or float('nan')):6.3f}  {accs}")
        if status[name]:
            print(f"  {name} exited {status[name]}; last log lines:\n" +
                  "\n".join((out / f"{name}.log").read_text().splitlines()[-15:]))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.pack:
        pack(out, summary, Path(args.pack))


def pack(out: Path, summary: dict, dest: Path) -> None:
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest / "runs.tgz", "w:gz") as tar:
        for f in sorted(out.rglob("*")):
            if f.is_file() and "checkpoints" not in f.parts and f.suffix != ".safetensors":
                tar.add(f, arcname=str(f.relative_to(out)))
    last = {n: r["evals"][-1]["acc"] for n, r in summary["runs"].items() if r["evals"]}
    for name in sorted(last, key=last.get, reverse=True)[:3]:
        if (out / name / "final").is_dir():
            with tarfile.open(dest / f"final_{name}.tgz", "w:gz") as tar:
                tar.add(out / name / "final", arcname=f"{name}/final")


if __name__ == "__main__":
    main()
