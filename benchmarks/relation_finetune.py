"""Does fine-tuning teach the object order? (`python benchmarks/relation_finetune.py`)

Trains a shipped config (the demo's by default) on relation prompts only and measures held-out
relation accuracy -- the exact verifier on held-out relation prompts x seeds, default sampling --
before training and every ``--every`` epochs. docs/shapes.md ("Does fine-tuning teach the object
order?") reports the demo's curve. Prints one line per evaluation and writes ``curve.jsonl`` into
``--out``.

    python benchmarks/relation_finetune.py --epochs 15 --every 5 --set prompts.relation_fraction=1.0
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from diffalign.config import from_dict, merge, parse_overrides
from diffalign.core.sampling import generate
from diffalign.runtime.sampling import resolve_sampling
from diffalign.runtime.trainer import TrainConfig, Trainer
from diffalign.worlds import shapes

ROOT = Path(__file__).resolve().parents[1]


def relation_prompts(n: int, seed: int = 4242) -> list[str]:
    """The first ``n`` relation prompts of a held-out draw."""
    out = [p for p in shapes.sample_prompts(8 * n, "heldout", seed=seed) if shapes.parse(p).kind == "relation"]
    if len(out) < n:
        raise SystemExit(f"--prompts: only {len(out)} held-out relation prompts in the draw, asked for {n}")
    return out[:n]


def relation_accuracy(trainer: Trainer, prompts: list[str], seeds: int) -> float:
    model = trainer._policy()
    model.eval()
    accs = []
    with torch.no_grad():
        for s in range(seeds):
            images = generate(model, prompts, [1000 * s + i for i in range(len(prompts))], **resolve_sampling(model))
            accs.append(shapes.verify(images, prompts).correct.mean())
    return float(np.mean(accs))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--every", type=int, default=5, help="epochs between evaluations")
    p.add_argument("--prompts", type=int, default=150, help="held-out relation prompts")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/relation-finetune")
    p.add_argument("--set", nargs="*", default=["prompts.relation_fraction=1.0"], metavar="KEY=VALUE",
                   help="overrides of the config (default: relation prompts only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    raw = yaml.safe_load(Path(args.config).read_text())
    raw = merge(raw, {"epochs": args.epochs, "max_minutes": 0.0, "eval_every": 0, "heldout_rewards": []})
    cfg = from_dict(TrainConfig, merge(raw, parse_overrides(args.set)))
    out = Path(args.out)
    shutil.rmtree(out / "run", ignore_errors=True)  # a fresh run each time
    trainer = Trainer(cfg, out / "run", progress=False)
    prompts = relation_prompts(args.prompts)
    t0, rows = time.time(), []

    def record(epoch: int) -> None:
        row = {"epoch": epoch, "images": epoch * trainer.algo_cfg.batch_size,
               "relation": round(relation_accuracy(trainer, prompts, args.seeds), 4),
               "minutes": round((time.time() - t0) / 60, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    record(0)
    for start in range(0, args.epochs, args.every):
        trainer.start_epoch = start
        trainer.fit(stop_at=min(start + args.every, args.epochs))
        record(min(start + args.every, args.epochs))
    (out / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    main()
