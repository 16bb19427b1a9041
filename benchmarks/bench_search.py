"""Inference-time search on the shapes world: held-out exact accuracy against NFE for every method.

Held-out prompts (``shapes.sample_prompts(P, "heldout", seed=0)``), one image per prompt, fixed
seeds; every method gets the same total budget ``b * num_steps * P`` for ``b`` samples' worth.
Gradient-free methods search the exact verifier score (``shapes``); the noise-optimisation methods
need a differentiable reward and ascend ``shapes_soft``. Everything is measured with the exact
verifier (``shapes.verify(...).correct``). Runs are ordered by budget, so if the time guard
(``--max-seconds``) stops early only the largest budgets of the last methods are missing.

Run: ``make bench-search`` (or ``python benchmarks/bench_search.py [--tuned DIR]`` to add RLG).
Writes ``runs/bench-search/{results.json, table.md, accuracy_vs_nfe.png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffalign import search
from diffalign.models import load_model
from diffalign.worlds import shapes

# method -> (reward it searches, options); budgets below a method's minimum are skipped
METHODS = {
    "best_of_n": ("shapes", {}),
    "smc": ("shapes", {"potential": "max", "lam": 1.0}),  # lambda chosen on train-split prompts (docs/search.md)
    "beam": ("shapes", {"beam_width": 2, "lookahead_steps": 2}),
    "code": ("shapes", {"block_size": 2}),
    "svdd": ("shapes", {}),
    "dts": ("shapes", {}),
    "reno": ("shapes_soft", {"lr": 1.0}),
    "dno": ("shapes_soft", {"lr": 0.01}),
    "mira": ("shapes_soft", {"lr": 0.02, "kl_weight": 10.0}),
    "rlg": ("shapes", {"weight": 1.5}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-flow")
    p.add_argument("--tuned", default=None, help="fine-tuned model / run directory: adds RLG")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--budgets", default="1,2,4,8", help="samples' worth per image (gradient-free methods)")
    p.add_argument("--grad-budgets", default="2,4,8", help="samples' worth per image (noise optimisation)")
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "rlg"))
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=3600.0, help="skip runs projected to end later")
    p.add_argument("--out", default="runs/bench-search")
    args = p.parse_args()

    t_start = time.perf_counter()
    torch.manual_seed(0)
    model = load_model(args.model)
    tuned = search.resolve_tuned(args.tuned) if args.tuned else None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if tuned is not None and "rlg" not in methods:
        methods.append("rlg")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    if "rlg" in methods and tuned is None:
        raise SystemExit("rlg needs --tuned DIR")
    prompts = shapes.sample_prompts(args.prompts, "heldout", seed=0)
    T = args.steps or model.sampling_defaults["num_steps"]
    budgets = [int(b) for b in args.budgets.split(",")]
    grad_budgets = [int(b) for b in args.grad_budgets.split(",")]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {args.model}, {len(prompts)} held-out "
          f"prompts, {T} steps, budgets {budgets} (noise optimisation {grad_budgets}) samples' worth per image")

    plan = sorted(((b, m) for m in methods for b in (grad_budgets if m in search.GRADIENT_METHODS else budgets)),
                  key=lambda bm: (bm[0], methods.index(bm[1])))
    ms_per_nfe: dict[str, float] = {}
    results: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for b, m in plan:
        reward, opts = METHODS[m]
        total = b * T * len(prompts)
        kind = "grad" if m in search.GRADIENT_METHODS else "free"
        est = ms_per_nfe.get(kind, ms_per_nfe.get("free", 0.0) * (3 if kind == "grad" else 1)) * total / 1e3
        elapsed = time.perf_counter() - t_start
        if elapsed + est > args.max_seconds:
            print(f"  skip {m} at {b} samples' worth: projected to end at {elapsed + est:.0f}s "
                  f"> {args.max_seconds:.0f}s")
            results[m][b] = {"skipped": "time"}
            continue
        t0 = time.perf_counter()
        try:
            res = search.run(m, model, prompts, reward, budget=total, tuned=tuned if m == "rlg" else None,
                             num_steps=args.steps, seed=args.seed, **opts)
        except ValueError as e:
            if "below the minimum" not in str(e):
                raise
            results[m][b] = {"skipped": "budget"}
            continue
        dt = time.perf_counter() - t0
        ms_per_nfe[kind] = 1e3 * dt / max(res.nfe, 1)
        ver = shapes.verify(res.images, prompts)
        cats = shapes.accuracy_by_category(prompts, ver.correct)
        results[m][b] = {"accuracy": float(np.mean(ver.correct)), "verifier_score": float(np.mean(ver.score)),
                         "reward": reward, "mean_reward": float(res.scores.mean()), "nfe": res.nfe,
                         "nfe_per_image": res.nfe / len(prompts), "seconds": dt,
                         "count_accuracy": cats.get("count"), "relation_accuracy": cats.get("relation"),
                         "sampler": res.trace["sampler"]}
        print(f"  {m:<10} {b} samples' worth: exact accuracy {results[m][b]['accuracy']:.3f}, verifier score "
              f"{results[m][b]['verifier_score']:.3f}, NFE/image {res.nfe / len(prompts):.1f}, {dt:.1f}s")

    table = _table(results, sorted(set(budgets) | set(grad_budgets)), T)
    print()
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "prompts": prompts, "num_steps": T, "seed": args.seed, "methods": METHODS,
            "seconds": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    (out / "table.md").write_text(table + "\n")
    _plot(results, T, out / "accuracy_vs_nfe.png", len(prompts))
    print(f"\nwrote {out}/results.json, table.md, accuracy_vs_nfe.png in {time.perf_counter() - t_start:.0f}s")


def _table(results: dict, budgets: list[int], T: int) -> str:
    head = "| method | reward | " + " | ".join(f"{b}x ({b * T} NFE/img)" for b in budgets) + " |"
    lines = [head, "|" + "---|" * (len(budgets) + 2)]
    for m, row in results.items():
        cells = []
        for b in budgets:
            r = row.get(b)
            if r is None:
                cells.append("")
            elif "skipped" in r:
                cells.append(f"-- ({r['skipped']})")
            else:
                cells.append(f"{r['accuracy']:.3f} ({r['nfe_per_image']:.0f})")
        lines.append(f"| {m} | {METHODS[m][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\ncells: held-out exact accuracy (NFE per image actually spent)"


def _plot(results: dict, T: int, path: Path, n_prompts: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for m, row in results.items():
        pts = sorted((r["nfe_per_image"], r["accuracy"]) for r in row.values() if "accuracy" in r)
        if pts:
            style = "--" if m in search.GRADIENT_METHODS else "-"
            ax.plot(*zip(*pts), style, marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE per image (guided denoiser evaluations)")
    ax.set_ylabel("held-out exact accuracy (verifier)")
    ax.set_title(f"shapes world, {n_prompts} held-out prompts, {T}-step samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
