"""Learnability curves of shapes-world pretraining recipes (docs/shapes.md, "Learning relations").

Trains each recipe (a set of ``PretrainConfig`` overrides) from scratch and, every ``--eval-every``
steps, samples the raw weights with the model's default sampler on fixed train-split and held-out
prompts and records what a relation needs -- P(both objects right), P(relation | both right),
relation accuracy -- beside count accuracy and single-object accuracy:

    python benchmarks/learnability.py --recipes v1,pos,pos_high --steps 1500 --eval-every 250
    python benchmarks/learnability.py --recipes pos_high --set model=vp --steps 800 --out runs/learn_vp

Rows go to ``OUT/curves.jsonl`` (one per recipe, step and split); the table is printed at the end.
One standard error of a rate p over n prompts is sqrt(p (1 - p) / n): about 0.05 at n = 100.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from diffalign.config import load_config
from diffalign.runtime.pretrain import PretrainConfig, pretrain
from diffalign.worlds import shapes, shapes_metrics

# Recipes compared in docs/shapes.md; each is a list of PretrainConfig overrides.
RECIPES: dict[str, list[str]] = {
    "v1": ["text_pos_std=0.02"],  # the v1 recipe: logit-normal(0, 1) t, small position embeddings
    "pos": ["text_pos_std=1.0"],  # position embeddings on the token embeddings' scale
    "high": ["text_pos_std=0.02", "t_high_fraction=0.5", "t_high_min=0.6"],  # half the t's in U[0.6, 1]
    "pos_high": ["text_pos_std=1.0", "t_high_fraction=0.5", "t_high_min=0.6"],
    "pos_shift": ["text_pos_std=1.0", "t_logit_mean=1.0"],  # logit-normal shifted towards noise
    "pos_high_rel": ["text_pos_std=1.0", "t_high_fraction=0.5", "t_high_min=0.6", "relation_fraction=0.7"],
    # role embeddings of the two objects, added after the text encoder (ShapesModelConfig.role_words)
    "pos_high_roles": ["text_pos_std=1.0", "t_high_fraction=0.5", "t_high_min=0.6", "text_roles=true"],
    "pos_high_roles1": ["text_pos_std=1.0", "t_high_fraction=0.5", "t_high_min=0.6", "text_roles=true",
                        "text_role_std=1.0"],
    # role 1 = the object that goes left / up: the relation word's XOR with the mention order done by the tokenizer
    "pos_high_layout": ["text_pos_std=1.0", "t_high_fraction=0.5", "t_high_min=0.6", "text_roles=true",
                        "text_role_std=1.0", "text_role_order=layout"],
    "pos_high_seq": ["text_pos_std=1.0", "t_high_fraction=0.5", "t_high_min=0.6", "sequence_pool=true"],
}
METRICS = ("one", "colour", "count", "both_right", "relation_given_both", "swapped_given_both", "relation", "overall",
           "swap_both", "swap_same_place")
HEADERS = ("one", "colour", "count", "both", "relation|both", "swapped|both", "relation", "overall", "twins both",
           "twins same")


def eval_prompts(split: str, n_relation: int, count_seeds: int, seed: int = 7) -> tuple[list[str], list[int]]:
    """``n_relation`` relation prompts of ``split`` (one image each) and every count prompt of the split
    ``count_seeds`` times; the seeds are fixed so every recipe and step sees the same noise."""
    rel = shapes.sample_prompts(n_relation, split, seed=seed, kinds=("relation",))
    count = [p for p in shapes.all_prompts("count") if shapes.split_of(p) == split] * count_seeds
    prompts = rel + count
    return prompts, list(range(seed * 100_000, seed * 100_000 + len(prompts)))


def profile(model, prompts: list[str], seeds: list[int], batch: int = 128) -> dict[str, float]:
    """Accuracy by category, the relation breakdown and the order gap of ``model``'s default sampling."""
    parts = shapes_metrics.profile(model, prompts, seeds, batch)
    gap = shapes_metrics.order_gap(model, prompts)
    swap = shapes_metrics.swap_test(model, prompts, seeds, batch)
    return {**{k: parts.get(k, 0.0) for k in ("one", "two", "three", "four", "count", "relation", "overall", "colour",
                                               "both_right", "relation_given_both", "swapped_given_both")},
            "order_gap_pooled": gap["pooled"], "order_gap_object": gap["object"],
            "swap_both": swap["both"], "swap_one": swap["one"], "swap_same_place": swap["same_place"]}


def run_recipe(name: str, overrides: list[str], args, out: Path, log) -> None:
    cfg = load_config(PretrainConfig, overrides=[*overrides, *args.set, f"steps={args.steps}"])
    sets = {split: eval_prompts(split, args.relation_prompts, args.count_seeds) for split in args.splits}
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    t0, eval_s = time.time(), [0.0]

    def on_step(step: int, model, ema) -> None:
        if step % args.eval_every and step != cfg.steps:
            return
        train_s = time.time() - t0 - eval_s[0]
        for split, (prompts, seeds) in sets.items():
            e0 = time.time()
            log({"recipe": name, "step": step, "images": step * cfg.batch_size, "split": split,
                 **profile(model, prompts, seeds), "train_s": round(train_s, 1)})
            eval_s[0] += time.time() - e0

    if cfg.init_from:  # a continued run: its starting point is step 0 of the curve
        from diffalign.runtime.pretrain import init_model

        on_step(0, init_model(cfg).eval(), None)
    pretrain(cfg, run_dir, progress=False, on_step=on_step)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="v1,pos,pos_high", help=f"comma-separated, from: {', '.join(RECIPES)}")
    ap.add_argument("--set", action="append", default=[], help="extra PretrainConfig override for every recipe")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--relation-prompts", type=int, default=100, help="relation prompts per split")
    ap.add_argument("--count-seeds", type=int, default=2, help="images per count prompt of the split")
    ap.add_argument("--splits", default="train,heldout")
    ap.add_argument("--out", type=Path, default=Path("runs/learnability"))
    ap.add_argument("--keep", action="store_true", help="keep each recipe's weights and checkpoint")
    args = ap.parse_args(argv)
    args.splits = args.splits.split(",")
    unknown = [r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; steps {args.steps}, eval every "
          f"{args.eval_every}, {args.relation_prompts} relation prompts + count prompts x {args.count_seeds} per split")
    table: list[dict] = []
    with (args.out / "curves.jsonl").open("a") as f:
        def log(row: dict) -> None:
            table.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

        for name in args.recipes.split(","):
            run_recipe(name, RECIPES[name], args, args.out, log)
    print(f"\n{'recipe':<14}{'split':<9}{'step':>6}" + "".join(f"{h:>14}" for h in HEADERS))
    for r in table:
        cells = "".join(f"{r.get(m, np.nan):>14.3f}" for m in METRICS)
        print(f"{r['recipe']:<14}{r['split']:<9}{r['step']:>6}" + cells)


if __name__ == "__main__":
    main()
