"""Sample efficiency of the online methods on the shapes world (`make bench-efficiency`).

In one run, with the same prompts, reward, seeds and base model, every method trains from its
shipped config (`configs/<name>_shapes.yaml`: the papers' hyperparameters scaled to the world; no
tuning on the evaluation prompts) for the same number of generated images, and its held-out exact
accuracy (the trainer's ODE evaluation on held-out prompts) is recorded against the number of
images generated so far. Prints a table and the images each method needs to reach Flow-GRPO's
final accuracy, and writes ``efficiency.json`` + ``efficiency.png`` into ``--out`` (a directory
`diffalign report` renders: the curves are embedded in the report).

Methods run one after another (never two trainings at once on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from diffalign.config import from_dict, merge
from diffalign.evaluation.efficiency import EFFICIENCY_FILE, efficiency_plot, images_to_reach
from diffalign.runtime.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"flow_grpo": "flow_grpo_shapes", "dance_grpo": "dance_grpo_shapes", "diffusion_nft": "nft_shapes",
           "awm": "awm_shapes", "crd": "crd_shapes"}


def run_method(method: str, args: argparse.Namespace, out: Path) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / f"{METHODS[method]}.yaml").read_text())
    batch = raw.get("algorithm", {}).get("batch_size", 64)
    epochs = max(1, args.images // batch)
    every = max(1, args.eval_every_images // batch)
    raw = merge(raw, {"epochs": epochs, "eval_every": every, "eval_prompts": args.eval_prompts, "seed": args.seed,
                      "max_minutes": 0.0, "checkpoint_every": epochs, "heldout_rewards": []})
    cfg = from_dict(TrainConfig, raw)
    t0 = time.time()
    shutil.rmtree(out / method, ignore_errors=True)  # a fresh run each time
    trainer = Trainer(cfg, out / method, progress=False)
    curve = [{"images": 0, **trainer.evaluate_heldout()}]  # the base model, same prompts and seeds
    trainer.fit()
    for line in (out / method / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/heldout_accuracy" in row:
            curve.append({"images": row["images_seen"], "eval/heldout_accuracy": row["eval/heldout_accuracy"],
                          "eval/heldout_score": row["eval/heldout_score"]})
    return {"config": f"configs/{METHODS[method]}.yaml", "curve": curve, "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--images", type=int, default=3200, help="generated images per method")
    p.add_argument("--eval-every-images", type=int, default=640)
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench-efficiency")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for m in methods:
        print(f"[{m}] {args.images} images ...", flush=True)
        results[m] = run_method(m, args, out)
        print(f"[{m}] " + "  ".join(f"{c['images']}: {c['eval/heldout_accuracy']:.3f}" for c in results[m]["curve"])
              + f"  ({results[m]['wall_s']:.0f} s)", flush=True)
    summary = {"images": args.images, "eval_prompts": args.eval_prompts, "seed": args.seed, "methods": results}
    if "flow_grpo" in results:
        target = results["flow_grpo"]["curve"][-1]["eval/heldout_accuracy"]
        summary["flow_grpo_final"] = target
        grpo_n = images_to_reach(results["flow_grpo"]["curve"], target)
        for m, r in results.items():
            n = images_to_reach(r["curve"], target)
            r["images_to_flow_grpo_final"] = n
            r["speedup_vs_flow_grpo"] = None if n in (None, 0) or grpo_n is None else round(grpo_n / n, 2)
    (out / EFFICIENCY_FILE).write_text(json.dumps(summary, indent=2))
    (out / "efficiency.png").write_bytes(efficiency_plot(summary))
    print(f"\nheld-out accuracy ({args.eval_prompts} held-out prompts, ODE) against generated images")
    cols = sorted({c["images"] for r in results.values() for c in r["curve"]})
    print(f"{'method':<14}" + "".join(f"{c:>8}" for c in cols) + f"{'to GRPO final':>15}{'speed-up':>10}{'wall s':>8}")
    for m, r in results.items():
        acc = {c["images"]: c["eval/heldout_accuracy"] for c in r["curve"]}
        cells = "".join(f"{acc[c]:>8.3f}" if c in acc else f"{'':>8}" for c in cols)
        n, s = r.get("images_to_flow_grpo_final"), r.get("speedup_vs_flow_grpo")
        print(f"{m:<14}{cells}{('-' if n is None else n):>15}{('-' if s is None else s):>10}{r['wall_s']:>8.0f}")
    print(f"\nwrote {out / EFFICIENCY_FILE} and {out / 'efficiency.png'} (diffalign report {out} embeds them)")


if __name__ == "__main__":
    main()
