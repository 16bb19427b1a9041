"""Sample efficiency of the online methods on the shapes world (`make bench-efficiency`).

In one run, with the same prompts, reward, seeds and base model, every method trains from its
shipped config (`configs/<name>_shapes.yaml`: the papers' hyperparameters scaled to the world; no
tuning on the evaluation prompts) for the same number of generated images, and its held-out exact
accuracy (the trainer's ODE evaluation on held-out prompts; by category where the trainer reports
it) is recorded against the number of images generated so far and against the minutes spent
sampling and training (evaluation excluded).

Generated images are the trajectories the method rolled out (the trainer's ``images_seen``). What
dense rewards and branches cost beyond them is counted, not estimated: a forward hook on the
trainable backbone counts every sample row it evaluates (a CFG pair counts 2) while the method
samples (rollouts, ODE completions, branches, Tweedie estimates) and while it trains (policy and
reference passes), reported per generated image, and ``scored/img`` is how many images the reward
scored per generated image.

Prints a table with the images each method needs to reach Flow-GRPO's best accuracy, and writes
``efficiency.json`` + ``efficiency.png`` into ``--out`` (a directory `diffalign report` renders).
Methods run one after another (never two trainings at once on 2 cores); a later invocation with the
same settings and ``--out`` adds its methods to the file, so a long comparison can run one method per
command: ``python benchmarks/bench_efficiency.py --methods dense_grpo --images 7680 ...``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from diffalign.config import from_dict, merge, parse_overrides
from diffalign.evaluation.efficiency import EFFICIENCY_FILE, KEY, efficiency_plot, efficiency_rows, images_to_reach
from diffalign.runtime.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"flow_grpo": "flow_grpo_shapes", "dance_grpo": "dance_grpo_shapes", "diffusion_nft": "nft_shapes",
           "awm": "awm_shapes", "crd": "crd_shapes",
           # step-level credit (docs/algorithms/step_credit.md)
           "dense_grpo": "dense_grpo_shapes", "dense_grpo_tweedie": "dense_grpo_tweedie_shapes",
           "tp_grpo": "tp_grpo_shapes", "g2rpo": "g2rpo_shapes", "b2_diffurl": "b2_diffurl_shapes",
           "prdp": "prdp_shapes", "vard": "vard_shapes"}


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The denoising network of a model (under LoRA, of its base model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.trainable_module()


class EvalCounter:
    """Counts the sample rows the backbones (the policy's and a frozen reference's) evaluate, by phase
    (``sample`` / ``train`` / ``eval``)."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.counts = {"sample": 0, "train": 0, "eval": 0}
        self.phase = "train"
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.ndim > 0:
            self.counts[self.phase] += int(x.shape[0])

    def during(self, phase: str, fn):
        def wrapped(*a, **kw):
            before, self.phase = self.phase, phase
            try:
                return fn(*a, **kw)
            finally:
                self.phase = before
        return wrapped


def run_method(method: str, args: argparse.Namespace, out: Path) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / f"{METHODS[method]}.yaml").read_text())
    batch = merge(raw, parse_overrides(args.set)).get("algorithm", {}).get("batch_size", 64)
    epochs = max(1, args.images // batch)
    every = max(1, args.eval_every_images // batch)
    raw = merge(raw, {"epochs": epochs, "eval_every": every, "eval_prompts": args.eval_prompts, "seed": args.seed,
                      "max_minutes": 0.0, "checkpoint_every": epochs, "heldout_rewards": []})
    raw = merge(raw, parse_overrides(args.set))
    cfg = from_dict(TrainConfig, raw)
    t0 = time.time()
    shutil.rmtree(out / method, ignore_errors=True)  # a fresh run each time
    trainer = Trainer(cfg, out / method, progress=False)
    frozen = getattr(trainer.algorithm.reference, "frozen", None)  # a full fine-tune's reference copy
    counter = EvalCounter([backbone(trainer._trainable_module()), *([backbone(frozen)] if frozen is not None else [])])
    trainer.algorithm.collect = counter.during("sample", trainer.algorithm.collect)
    trainer.evaluate_heldout = counter.during("eval", trainer.evaluate_heldout)
    curve = [{"images": 0, "minutes": 0.0, **trainer.evaluate_heldout()}]  # the base model, same prompts and seeds
    trainer.fit()
    for h in counter.handles:
        h.remove()
    minutes, scored, n_images = 0.0, [], 0
    for line in (out / method / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        minutes += (row["sample_s"] + row["train_s"]) / 60
        scored.append(row.get("scored_per_image", 1.0))
        n_images = row["images_seen"]
        if KEY in row:
            curve.append({"images": row["images_seen"], "minutes": round(minutes, 2),
                          **{k: v for k, v in row.items() if k.startswith("eval/")}})
    return {"config": f"configs/{METHODS[method]}.yaml", "curve": curve, "wall_s": round(time.time() - t0, 1),
            "nfe_sample_per_image": round(counter.counts["sample"] / n_images, 1),
            "nfe_train_per_image": round(counter.counts["train"] / n_images, 1),
            "scored_per_image": round(sum(scored) / len(scored), 2)}


def summarise(summary: dict) -> dict:
    """Flow-GRPO's best trained accuracy, and the images each method needs to reach it."""
    results = summary["methods"]
    if "flow_grpo" not in results:
        return summary
    trained = [c for c in results["flow_grpo"]["curve"] if c["images"] > 0]
    target = max(c[KEY] for c in trained)
    summary["flow_grpo_best"] = target
    grpo_n = images_to_reach(trained, target)
    for r in results.values():
        n = images_to_reach([c for c in r["curve"] if c["images"] > 0], target)
        r["images_to_flow_grpo_best"] = n
        r["speedup_vs_flow_grpo"] = None if n is None or grpo_n is None else round(grpo_n / n, 2)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--images", type=int, default=3200, help="generated images per method")
    p.add_argument("--eval-every-images", type=int, default=640)
    p.add_argument("--eval-prompts", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench-efficiency")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides for every method's config (a quick check: algorithm.batch_size=16)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"images": args.images, "eval_prompts": args.eval_prompts, "seed": args.seed, "set": args.set}
    summary = {**settings, "methods": {}}
    previous = out / EFFICIENCY_FILE
    if previous.is_file():  # add to an earlier run with the same settings (one method per command)
        old = json.loads(previous.read_text())
        if all(old.get(k) == v for k, v in settings.items()):
            summary["methods"] = old["methods"]
    for m in methods:
        print(f"[{m}] {args.images} images ...", flush=True)
        summary["methods"][m] = r = run_method(m, args, out)
        print(f"[{m}] " + "  ".join(f"{c['images']}: {c[KEY]:.3f}" for c in r["curve"])
              + f"  ({r['wall_s']:.0f} s, {r['nfe_sample_per_image']} + {r['nfe_train_per_image']} evaluations/image)",
              flush=True)
    summary = summarise(summary)
    (out / EFFICIENCY_FILE).write_text(json.dumps(summary, indent=2))
    (out / "efficiency.png").write_bytes(efficiency_plot(summary))
    header, rows = efficiency_rows(summary)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\nheld-out accuracy ({args.eval_prompts} held-out prompts, ODE) against generated images")
    for line in [header, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    print(f"\nwrote {out / EFFICIENCY_FILE} and {out / 'efficiency.png'} (diffalign report {out} embeds them)")


if __name__ == "__main__":
    main()
