"""Every fine-tuning family on the shapes world's shipped base models, one table (docs/shapes.md).

Each method trains from its shipped config (``configs/<name>.yaml``, overrides below) for the same
wall-clock budget, then the tuned model and its base are sampled on the same held-out prompts and
seeds (default sampling) and compared: exact accuracy by category, the relation breakdown (P(both
objects right), P(relation | both right)), diversity against the base's, held-out rewards, images
generated and minutes. Methods run one after another (never two trainings at once on 2 cores):

    python benchmarks/bench_methods.py --minutes 10 --out runs/bench-methods
    python benchmarks/bench_methods.py --methods diffusion_nft,flow_grpo --set lr=3e-4 --minutes 5

Writes ``OUT/methods.json`` and ``OUT/table.md``. Inference-time search at equal NFE is
``benchmarks/bench_search.py --methods best_of_n,smc,dts``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from diffalign import rewards
from diffalign.config import from_dict, merge, parse_overrides
from diffalign.evaluation import evaluate
from diffalign.models import load_model
from diffalign.runtime.trainer import TrainConfig, Trainer
from diffalign.worlds import shapes

ROOT = Path(__file__).resolve().parents[1]
# method -> (shipped config, overrides for this comparison)
METHODS: dict[str, tuple[str, dict]] = {
    "flow_grpo": ("flow_grpo_shapes", {}),
    "dance_grpo": ("dance_grpo_shapes", {}),
    "ddpo": ("ddpo_shapes", {}),  # on shapes-vp
    "diffusion_nft": ("nft_shapes", {}),
    "awm": ("awm_shapes", {}),
    "crd": ("crd_shapes", {}),
    "dpo": ("dpo_shapes", {"algorithm": {"source": "policy", "data": ""}}),  # on-policy pairs ranked by the verifier
    "draft": ("draft_shapes", {}),
    "vgg_flow": ("vgg_flow_shapes", {}),
    "nft_demo": ("demo", {}),  # DiffusionNFT as `make demo` runs it (configs/demo.yaml)
}
HELDOUT_REWARDS = ("shapes_soft", "colorfulness")
COLUMNS = ("one", "count", "relation", "overall")


def run_method(method: str, args: argparse.Namespace, prompts: list[str], out: Path) -> dict:
    config, overrides = METHODS[method]
    raw = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())
    raw = merge(merge(raw, overrides), {"epochs": 100_000, "max_minutes": args.minutes, "eval_every": 0,
                                         "checkpoint_every": 100_000, "seed": args.seed, "heldout_rewards": []})
    raw = merge(raw, parse_overrides(args.set))
    cfg = from_dict(TrainConfig, raw)
    run_dir = out / method
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    final = Trainer(cfg, run_dir, progress=False).fit()
    train_min = (time.time() - t0) / 60
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    images = max((r.get("images_seen", 0) for r in rows), default=0)
    reward_list = [rewards.get(cfg.reward), *(rewards.get(n) for n in HELDOUT_REWARDS if n != cfg.reward)]
    if "shapes" not in [r.name for r in reward_list]:
        reward_list.append(rewards.get("shapes"))
    res = evaluate({"base": load_model(cfg.model), "tuned": load_model(final)}, prompts, base="base",
                   seeds_per_prompt=args.seeds, seed=args.seed, rewards=reward_list, target=cfg.reward)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"config": f"configs/{config}.yaml", "overrides": merge(overrides, parse_overrides(args.set)),
            "model": cfg.model, "images": images, "minutes": round(train_min, 1), "eval": res["models"]}


def row(name: str, r: dict, label: str) -> str:
    m = r["eval"][label]
    acc, parts = m["shapes"]["accuracy"], m["shapes"]["breakdown"]
    div = m["diversity"] / max(r["eval"]["base"]["diversity"], 1e-12)
    held = " ".join(f"{n} {m['rewards'][n]['mean']:.3f}" for n in HELDOUT_REWARDS if n in m["rewards"])
    images, minutes = ("0", "0") if label == "base" else (str(r["images"]), f"{r['minutes']:.1f}")
    return (f"| {name} | {r['model']} | {images} | {minutes} | " + " | ".join(f"{acc.get(c, 0):.3f}" for c in COLUMNS)
            + f" | {parts.get('both_right', 0):.3f} | {parts.get('relation_given_both', 0):.3f} | {div:.2f} | {held} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per method")
    p.add_argument("--prompts", type=int, default=200, help="held-out evaluation prompts")
    p.add_argument("--seeds", type=int, default=2, help="images per evaluation prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="dotted override for every method, e.g. lr=3e-4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep each run directory")
    p.add_argument("--out", default="runs/bench-methods")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = shapes.sample_prompts(args.prompts, "heldout", seed=2024)
    results_file = out / "methods.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for m in methods:
        print(f"[{m}] training for {args.minutes} min ...", flush=True)
        results[m] = run_method(m, args, prompts, out)
        results_file.write_text(json.dumps(results, indent=2))
        print(row(m, results[m], "tuned"), flush=True)
    head = ("| method | model | images | minutes | " + " | ".join(COLUMNS)
            + " | both right | relation given both | diversity / base | held-out rewards |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for base_model in sorted({r["model"] for r in results.values()}):
        first = next(m for m, r in results.items() if r["model"] == base_model)
        lines.append(row(f"base ({base_model})", results[first], "base"))
        lines += [row(m, r, "tuned") for m, r in results.items() if r["model"] == base_model]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(f"\nheld-out, {args.prompts} prompts x {args.seeds} seeds, default sampling\n{table}")


if __name__ == "__main__":
    main()
