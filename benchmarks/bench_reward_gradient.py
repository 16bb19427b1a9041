"""Reward-gradient fine-tuning: peak memory of DRaFT-K against K and the chain length T, and the
reward-hacking step of a run.

Memory (default): one row per (T, K, checkpointing); each row runs in a fresh subprocess that loads
the model, runs one no-grad chain (warm-up), then one DRaFT-K loss + backward on the same batch.
Peak memory is the growth of the process's peak RSS over the warm-up (``resource.getrusage``
``ru_maxrss``; torch has no CPU allocator statistics) or, on CUDA, ``torch.cuda.max_memory_allocated``
over the warm-up's. Ratios printed: peak(K) / peak(K=1) at the longest chain (grows with K) and
peak(T) / peak(T_min) at K=1 (flat in T).

    python benchmarks/bench_reward_gradient.py [--device cuda] [--batch 8] [--steps 10 20 40] [--ks 1 2 5 10]

Hacking: ``--hacking RUN_DIR`` replays ``RUN_DIR/metrics.jsonl`` through the report's
``detect_hacking`` and prints the first epoch at which its warning appears (and why), with the
held-out verifier accuracy curve when the run logged one (``eval_every``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_row(args) -> dict:
    """Runs inside the fresh subprocess: the peak-memory growth of one DRaFT-K update."""
    from diffalign import algorithms, rewards
    from diffalign.models import load_model
    from diffalign.worlds import shapes

    device = torch.device(args.device)
    model = load_model(args.model, device=device)
    model.requires_grad_(False)
    model.trainable_module().requires_grad_(True)
    k = args.row_k
    cfg = algorithms.build_config("draft", {"batch_size": args.batch, "micro_batch_size": args.batch,
                                            "num_steps": args.row_t, "truncation": 0 if k >= args.row_t else k,
                                            "checkpoint": bool(args.row_ckpt)})
    algo = algorithms.get("draft")[1](cfg, reward=rewards.get("shapes_soft"))
    batch = algo.collect(model, shapes.sample_prompts(args.batch, "train", seed=0), epoch=0, seed=0)
    micro = next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0))))[0]
    with torch.no_grad():  # warm-up: the allocations every update pays anyway
        algo.run_chain(model, batch.cond, batch.uncond, batch.noise, False, seed=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_peak_mb()
    t0 = time.perf_counter()
    loss, _ = algo.loss(model, micro)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = rss_peak_mb() - base
    return {"T": args.row_t, "K": k, "checkpoint": bool(args.row_ckpt), "peak_mb": round(max(peak, 0.0), 1),
            "seconds": round(time.perf_counter() - t0, 2)}


def memory_table(args) -> None:
    rows = []
    configs = [(T, K, ckpt) for T in args.steps for K in args.ks if K <= T for ckpt in (1, 0)]
    for T, K, ckpt in configs:
        cmd = [sys.executable, __file__, "--row-t", str(T), "--row-k", str(K), "--row-ckpt", str(ckpt),
               "--model", args.model, "--batch", str(args.batch), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"T={r['T']:3d} K={r['K']:3d} checkpoint={r['checkpoint']!s:5s} "
              f"peak +{r['peak_mb']:8.1f} MB  {r['seconds']:6.2f} s", flush=True)
    unit = "MB of GPU memory (max_memory_allocated)" if args.device.startswith("cuda") else "MB of peak RSS"
    print(f"\nbatch {args.batch}, model {args.model}, device {args.device}; growth over a no-grad chain in {unit}")
    t_max, t_min, k_max = max(args.steps), min(args.steps), max(k for k in args.ks if k <= max(args.steps))
    for ckpt in (True, False):
        peak = {(r["T"], r["K"]): r["peak_mb"] for r in rows if r["checkpoint"] == ckpt}
        name = "checkpointed" if ckpt else "plain"
        if peak.get((t_max, 1)):
            print(f"{name}: peak(K={k_max}) / peak(K=1) at T={t_max}: {peak[(t_max, k_max)] / peak[(t_max, 1)]:.2f}x")
        if peak.get((t_min, 1)):
            print(f"{name}: peak(T={t_max}) / peak(T={t_min}) at K=1: {peak[(t_max, 1)] / peak[(t_min, 1)]:.2f}x")


def hacking(run_dir: Path) -> None:
    from diffalign.evaluation.hacking import detect_hacking

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    firing = [rows[n - 1]["epoch"] for n in range(1, len(rows) + 1) if detect_hacking(rows[:n])]
    acc = [(r["epoch"], r["eval/heldout_accuracy"]) for r in rows if "eval/heldout_accuracy" in r]
    print(f"{run_dir}: {len(rows)} epochs")
    if acc:
        print("held-out accuracy by epoch: " + ", ".join(f"{e}: {a:.3f}" for e, a in acc))
    if not firing:
        print("detect_hacking: no warning at any epoch")
        return
    spans, start = [], firing[0]  # epochs (curves up to and including them) at which the warning is shown
    for prev, e in zip(firing, firing[1:] + [None]):
        if e != prev + 1:
            spans.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = e
    first = next(n for n in range(1, len(rows) + 1) if rows[n - 1]["epoch"] == firing[0])
    print(f"detect_hacking: first warning after epoch {firing[0]}; shown after epochs {', '.join(spans)}")
    for reason in detect_hacking(rows[:first]):
        print("  " + reason)
    print("at the end of the run:")
    for reason in detect_hacking(rows) or ["(no warning)"]:
        print("  " + reason)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-flow")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10, 20, 40])
    p.add_argument("--hacking", type=Path, help="a run directory: report when detect_hacking first fires")
    p.add_argument("--row-t", type=int, help=argparse.SUPPRESS)
    p.add_argument("--row-k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--row-ckpt", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hacking:
        hacking(args.hacking)
    elif args.row_t:
        torch.set_num_threads(1)
        print(json.dumps(one_row(args)))
    else:
        memory_table(args)


if __name__ == "__main__":
    main()
