"""Preference methods on the shapes world: held-out accuracy, win rate, diversity, drift and wall
time of trained runs against their base model, on the same held-out prompts and seeds.

    python benchmarks/bench_preference.py --run dpo=runs/dpo --run kto=runs/kto --npo npo=runs/npo

``--run LABEL=RUN_DIR`` evaluates ``RUN_DIR/final``; ``--npo LABEL=RUN_DIR`` evaluates the *base*
model guided by ``RUN_DIR/final`` in the unconditional branch (Diffusion-NPO). Wall time is the
run's ``elapsed_s`` (training, without the final save) from ``RUN_DIR/metrics.jsonl``. Sampling:
the base model's defaults (10 Euler steps, CFG 3 for shapes-flow).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffalign import rewards
from diffalign.evaluation import evaluator
from diffalign.models import load_model
from diffalign.worlds import shapes


def parse_runs(items: list[str], flag: str) -> dict[str, Path]:
    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"{flag} expects LABEL=RUN_DIR, got {item!r}")
        out[evaluator.check_label(label)] = Path(path)
    return out


def run_info(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    return {"epochs": last["epoch"], "images_seen": last.get("images_seen"), "wall_s": last.get("elapsed_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="shapes-flow")
    p.add_argument("--run", action="append", default=[], help="LABEL=RUN_DIR (evaluates RUN_DIR/final)")
    p.add_argument("--npo", action="append", default=[], help="LABEL=RUN_DIR: base guided by RUN_DIR/final")
    p.add_argument("--prompts", type=int, default=200, help="held-out prompts")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (>= 2 for diversity)")
    p.add_argument("--prompt-seed", type=int, default=2024)
    p.add_argument("--out", default="", help="write the full evaluation JSON here")
    args = p.parse_args()

    runs, npo_runs = parse_runs(args.run, "--run"), parse_runs(args.npo, "--npo")
    base = load_model(args.base)
    models = {"base": base, **{k: load_model(d / "final") for k, d in runs.items()}}
    negatives = {}
    for label, d in npo_runs.items():
        models[label] = base
        negatives[label] = load_model(d / "final").eval()
    prompts = shapes.sample_prompts(args.prompts, "heldout", seed=args.prompt_seed)
    result = evaluator.evaluate(models, prompts, seeds_per_prompt=args.seeds, rewards=[rewards.get("shapes")],
                                target="shapes", base="base", negative_models=negatives)
    info = {k: run_info(d) for k, d in {**runs, **npo_runs}.items()}
    print(f"held-out: {args.prompts} prompts x {args.seeds} seeds (prompt seed {args.prompt_seed}), "
          f"sampling {result['sampling']}")
    print("| model | accuracy | count | relation | verifier score | win rate vs base | diversity | drift | "
          "train wall s (epochs) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, m in result["models"].items():
        acc, vs = m["shapes"]["accuracy"], m["vs_base"] or {}
        win = vs.get("win_rate", {}).get("shapes")
        run = info.get(label)
        cells = [label + (" (base + negative)" if label in negatives else ""), f"{acc['overall']:.3f}",
                 f"{acc.get('count', float('nan')):.3f}", f"{acc.get('relation', float('nan')):.3f}",
                 f"{m['shapes']['verifier_score']:.3f}", "-" if win is None else f"{win:.3f}",
                 f"{m['diversity']:.4f}", "-" if "drift" not in vs else f"{vs['drift']:.4f}",
                 "-" if run is None else f"{run['wall_s']} ({run['epochs']})"]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        evaluator.save_eval({**result, "runs": info}, args.out)


if __name__ == "__main__":
    main()
