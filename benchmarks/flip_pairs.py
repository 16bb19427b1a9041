"""A pairs file with a share of its labels flipped: the noisy-annotator setting of
docs/algorithms/preference.md ("Noisy labels").

    python benchmarks/flip_pairs.py runs/pairs/shapes-flow-train --fraction 0.25 --seed 0

The verifier's pairs are exact; human preference data is not (annotators of public preference sets
disagree on a large share of pairs). This writes ``pairs_flip<percent>.jsonl`` beside the source
``pairs.jsonl``: the same images and prompts, with ``chosen`` and ``rejected`` (and their scores)
swapped on a random ``fraction`` of the non-tie pairs, drawn from ``seed``. Flipped lines carry
``"label_flipped": true`` for the record; the readers ignore that field, so a trainer cannot see it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diffalign.config import atomic_write


def flip(lines: list[dict], fraction: float, seed: int) -> list[dict]:
    """``lines`` with ``chosen``/``rejected`` swapped on ``round(fraction * n)`` of the ``n`` non-tie lines."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    candidates = [i for i, rec in enumerate(lines) if not rec.get("tie", False)]
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(candidates, size=round(fraction * len(candidates)), replace=False).tolist())
    out = []
    for i, rec in enumerate(lines):
        rec = dict(rec)
        if i in chosen:
            for a, b in (("chosen", "rejected"), ("chosen_score", "rejected_score"), ("chosen_seed", "rejected_seed")):
                if a in rec or b in rec:
                    rec[a], rec[b] = rec.get(b), rec.get(a)
            rec["label_flipped"] = True
        out.append(rec)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs_dir", type=Path, help="a directory holding pairs.jsonl")
    ap.add_argument("--fraction", type=float, default=0.25, help="share of non-tie pairs whose label is flipped")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    src = args.pairs_dir / "pairs.jsonl"
    if not src.is_file():
        raise SystemExit(f"pairs_dir: {str(args.pairs_dir)!r} holds no pairs.jsonl")
    lines = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    out = flip(lines, args.fraction, args.seed)
    dest = args.pairs_dir / f"pairs_flip{round(100 * args.fraction)}.jsonl"
    atomic_write(dest, lambda f: f.write("".join(json.dumps(rec) + "\n" for rec in out).encode()))
    print(f"{dest}: {sum(r.get('label_flipped', False) for r in out)} of {len(out)} labels flipped")
    return dest


if __name__ == "__main__":
    main()
