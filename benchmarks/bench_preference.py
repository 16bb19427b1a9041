"""Preference methods on the shapes world: held-out accuracy, win rate, diversity, drift and wall
time of trained runs against their base model, on the same held-out prompts and seeds.

    python benchmarks/bench_preference.py --run dpo=runs/dpo --run kto=runs/kto --npo npo=runs/npo

``--run LABEL=RUN_DIR`` evaluates ``RUN_DIR/final``; ``--npo LABEL=RUN_DIR`` evaluates the model the
negative was trained from (the ``model`` of ``RUN_DIR/config.yaml``: the base, or e.g. a Diffusion-DPO
run's ``final`` for Self-NPO on a preference-tuned model) guided by ``RUN_DIR/final`` in the
unconditional branch (Diffusion-NPO, Self-NPO), and prints its accuracy paired against that model
without the negative when that model is among the rows (the base, or a ``--run``);
``--ppd LABEL=RUN_DIR:USER`` evaluates ``RUN_DIR/final`` conditioned on user ``USER``'s embedding
(personalised fine-tuning; the embeddings are read from the run's checkpoint). Wall time is the
run's ``elapsed_s`` (training, without the final save) from ``RUN_DIR/metrics.jsonl``. Sampling:
the base model's defaults (10 Euler steps, its default CFG: 4.5 for the v2 `shapes-flow`).

Accuracy is given with its standard error over prompts (each prompt's seeds averaged first);
``--compare LABEL`` adds every model's accuracy difference to that model's, paired on the same
prompts and seeds, with its standard error. ``--metrics a,b`` reports the mean of more rewards
(BalancedDPO's metrics) with their standard errors. ``--split train`` draws the prompts from the
training split instead, to choose a method's hyperparameters without looking at the held-out prompts
(docs/algorithms/preference.md, "Tuned per method").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

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


class Recorder:
    """A reward that keeps what it returned, call by call (evaluate scores the models in order)."""

    def __init__(self, reward):
        self.reward, self.name, self.calls = reward, reward.name, []

    def __call__(self, images, prompts, meta=None):
        out = torch.as_tensor(self.reward(images, prompts)).float()
        self.calls.append(out)
        return out


def prompt_se(values: np.ndarray, prompts: int) -> float:
    """Standard error of the mean over prompts of per-prompt means (values prompt-major)."""
    per_prompt = values.reshape(prompts, -1).mean(1)
    return float(per_prompt.std(ddof=1) / np.sqrt(prompts))


def npo_positive(run_dir: Path) -> str:
    """The model a negative was trained from: ``model`` in the run's ``config.yaml``."""
    import yaml

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise SystemExit(f"--npo: {run_dir} has no config.yaml naming the model its negative was trained from")
    return str(yaml.safe_load(cfg_file.read_text())["model"])


def same_model(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve() if Path(a).exists() and Path(b).exists() else str(a) == str(b)


def ppd_model(run_dir: Path, user: str):
    from diffalign.algorithms import build_config
    from diffalign.algorithms.ppd import personalize

    state = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    emb = state["algorithm"]["embeddings"]
    if user not in emb:
        raise SystemExit(f"--ppd: {run_dir} knows users {sorted(emb)}, not {user!r}")
    cfg = build_config("ppd", state["config"]["algorithm"])
    return personalize(load_model(run_dir / "final").eval(), emb[user], cfg)


def run_info(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    return {"epochs": last["epoch"], "images_seen": last.get("images_seen"), "wall_s": last.get("elapsed_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="shapes-flow")
    p.add_argument("--run", action="append", default=[], help="LABEL=RUN_DIR (evaluates RUN_DIR/final)")
    p.add_argument("--npo", action="append", default=[],
                   help="LABEL=RUN_DIR: the model RUN_DIR was trained from, guided by RUN_DIR/final")
    p.add_argument("--ppd", action="append", default=[], help="LABEL=RUN_DIR:USER: RUN_DIR/final as user USER (the first colon splits)")
    p.add_argument("--compare", default="", help="label whose accuracy the others are compared with (paired)")
    p.add_argument("--metrics", default="", help="comma-separated rewards to report beside the verifier")
    p.add_argument("--prompts", type=int, default=200, help="prompts drawn from --split")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"),
                   help="prompt split: heldout (the reported figures) or train (choosing hyperparameters "
                        "without looking at the held-out prompts)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (>= 2 for diversity)")
    p.add_argument("--prompt-seed", type=int, default=2024)
    p.add_argument("--out", default="", help="write the full evaluation JSON here")
    args = p.parse_args()

    runs, npo_runs = parse_runs(args.run, "--run"), parse_runs(args.npo, "--npo")
    ppd_runs = {k: (Path(str(v).split(":", 1)[0]), str(v).split(":", 1)[-1]) for k, v in
                parse_runs(args.ppd, "--ppd").items()}
    base = load_model(args.base)
    models = {"base": base, **{k: load_model(d / "final") for k, d in runs.items()}}
    negatives, positives = {}, {}  # positives: npo label -> the row of the same model without the negative
    for label, d in npo_runs.items():
        source = npo_positive(d)
        if same_model(source, args.base):
            models[label], positives[label] = base, "base"
        else:
            match = [k for k, r in runs.items() if same_model(source, r / "final")]
            models[label] = models[match[0]] if match else load_model(source)
            if match:
                positives[label] = match[0]
        negatives[label] = load_model(d / "final").eval()
    for label, (d, user) in ppd_runs.items():
        models[label] = ppd_model(d, user)
    if args.compare and args.compare not in models:
        raise SystemExit(f"--compare {args.compare!r} is not one of the models {sorted(models)}")
    prompts = shapes.sample_prompts(args.prompts, args.split, seed=args.prompt_seed)
    correct = Recorder(rewards.get("shapes_correct"))
    extra = [rewards.get(name) for name in args.metrics.split(",") if name]
    result = evaluator.evaluate(models, prompts, seeds_per_prompt=args.seeds,
                                rewards=[rewards.get("shapes"), correct, *extra], target="shapes", base="base",
                                negative_models=negatives)
    # evaluate scores the models one after another, each in the same number of calls
    per_model = dict(zip(models, np.split(torch.cat(correct.calls).numpy(), len(models))))
    info = {k: run_info(d) for k, d in {**runs, **npo_runs, **{k: v[0] for k, v in ppd_runs.items()}}.items()}
    print(f"{args.split}: {args.prompts} prompts x {args.seeds} seeds (prompt seed {args.prompt_seed}), "
          f"sampling {result['sampling']}")
    P = args.prompts
    vs_col = [f"accuracy - {args.compare}"] if args.compare else []
    print("| model | accuracy | " + " | ".join(vs_col) + (" | " if vs_col else "") + "count | relation | verifier score | "
          "win rate vs base | diversity | drift | " + "".join(f"{r.name} | " for r in extra) + "train wall s (epochs) |")
    print("|---" * (9 + len(vs_col) + len(extra)) + "|")
    for label, m in result["models"].items():
        acc, vs = m["shapes"]["accuracy"], m["vs_base"] or {}
        win = vs.get("win_rate", {}).get("shapes")
        run = info.get(label)
        c = per_model[label]
        cells = [label + (f" ({positives.get(label, 'its model')} + negative)" if label in negatives else "") + (" (as user)" if label in ppd_runs else ""),
                 f"{acc['overall']:.3f} ± {prompt_se(c, P):.3f}"]
        if args.compare:
            d = c - per_model[args.compare]
            cells.append("-" if label == args.compare else f"{d.mean():+.3f} ± {prompt_se(d, P):.3f}")
        cells += [f"{acc.get('count', float('nan')):.3f}", f"{acc.get('relation', float('nan')):.3f}",
                  f"{m['shapes']['verifier_score']:.3f}", "-" if win is None else f"{win:.3f}",
                  f"{m['diversity']:.4f}", "-" if "drift" not in vs else f"{vs['drift']:.4f}"]
        cells += [f"{m['rewards'][r.name]['mean']:.4f} ± {m['rewards'][r.name]['stderr']:.4f}" for r in extra]
        cells.append("-" if run is None else f"{run['wall_s']} ({run['epochs']})")
        print("| " + " | ".join(cells) + " |")
    for label, pos in positives.items():
        d = per_model[label] - per_model[pos]
        print(f"{label} (with its negative) - {pos} (without): {d.mean():+.3f} ± {prompt_se(d, P):.3f}")
    if args.out:
        correct = {k: v.tolist() for k, v in per_model.items()}  # per image, prompt-major: any pairing later
        evaluator.save_eval({**result, "runs": info, "correct": correct}, args.out)


if __name__ == "__main__":
    main()
