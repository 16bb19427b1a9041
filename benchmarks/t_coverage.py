"""Where in the noise range each fine-tuning method trains (`python benchmarks/t_coverage.py`).

Layout -- which object goes where -- is decided in the first, noisiest denoising steps (docs/shapes.md,
"Learning relations"). This measures, for each method's shipped shapes config, the times ``t`` of the
rows its loss actually sees (``t = 1`` is pure noise): the policy-gradient and step-credit methods
train on steps of their rollouts (``timestep_fraction``, ``timestep_choice``, MixGRPO's window,
G2RPO's single stochastic step, ...), the forward-process methods (DiffusionNFT, AWM, CRD) draw
their own ``t`` (``t_min``, ``t_max``, ``t_dist``). Nothing is trained: each method collects
``--epochs`` rollouts on its base model and its ``minibatches`` are enumerated, exactly as the
trainer would enumerate them.

Prints, per method, the share of loss rows at ``t >= 0.8`` and ``t >= 0.6``, the mean ``t`` and the
share of the base model's layout window a uniform draw would give (the reference row), and writes
``t_coverage.json`` into ``--out``. ``--set`` overrides every method's config (``--set
algorithm.timestep_choice=noisiest``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml

from diffalign.config import from_dict, merge, parse_overrides
from diffalign.runtime.trainer import TrainConfig, Trainer, epoch_seed

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["flow_grpo", "dance_grpo", "mix_grpo", "ddpo", "dense_grpo", "tp_grpo", "g2rpo", "b2_diffurl", "prdp",
           "vard", "nft", "awm", "crd", "demo"]


def config_path(method: str) -> Path:
    name = method if method == "demo" else f"{method}_shapes"
    return ROOT / "configs" / f"{name}.yaml"


def row_times(trainer: Trainer, epoch: int) -> torch.Tensor:
    """The ``t`` of every row the method's loss sees in one epoch (no optimiser step)."""
    seed = epoch_seed(trainer.cfg.seed, epoch)
    prompts = trainer.prompts.sample(trainer.algo_cfg.prompts_per_epoch, seed)
    model = trainer._policy()
    model.eval()
    batch = trainer.algorithm.collect(model, prompts, epoch=epoch, seed=seed)  # VARD fits its value here
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for micro_batches in trainer.algorithm.minibatches(batch, gen):
        for micro in micro_batches:
            if hasattr(micro, "steps"):  # a rollout row: step j goes from t_j to t_{j+1}
                out.append(batch.t[micro.steps.long()].double())
            else:  # a forward-process row: its own t
                out.append(torch.as_tensor(micro.t).double().flatten())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)  # VARD's warm-up epochs train nothing


def measure(method: str, epochs: int, overrides: list[str]) -> dict:
    raw = yaml.safe_load(config_path(method).read_text())
    raw = merge(raw, {"epochs": epochs, "eval_every": 0, "heldout_rewards": [], "max_minutes": 0.0})
    raw = merge(raw, parse_overrides(overrides))
    cfg = from_dict(TrainConfig, raw)
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, Path(d) / "run", progress=False)
        t = torch.cat([row_times(trainer, e) for e in range(epochs)])
    algo = raw.get("algorithm", {})
    knobs = {k: algo[k] for k in ("timestep_fraction", "timestep_choice", "t_min", "t_max", "t_dist", "sampler",
                                  "num_steps") if k in algo}
    return {"config": str(config_path(method).relative_to(ROOT)), "model": cfg.model, "knobs": knobs,
            "rows": len(t), "share_t_ge_0.8": round(float((t >= 0.8 - 1e-9).double().mean()), 3),
            "share_t_ge_0.6": round(float((t >= 0.6 - 1e-9).double().mean()), 3),
            "mean_t": round(float(t.mean()), 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--epochs", type=int, default=2, help="rollouts enumerated per method")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/t-coverage")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every method's config")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if not config_path(m).is_file():
            raise SystemExit(f"--methods: no shipped config for {m!r} ({config_path(m)}); choose from "
                             + ", ".join(METHODS))
    results = {}
    for m in methods:
        results[m] = measure(m, args.epochs, args.set)
        print(f"[{m}] {results[m]}", flush=True)
    print(f"{'method':>11}  {'rows':>6}  {'t>=0.8':>6}  {'t>=0.6':>6}  {'mean t':>6}  knobs")
    print(f"{'uniform':>11}  {'-':>6}  {0.2:6.3f}  {0.4:6.3f}  {0.5:6.3f}  t ~ U[0, 1] (the reference)")
    for m, r in results.items():
        knobs = " ".join(f"{k}={v}" for k, v in r["knobs"].items())
        print(f"{m:>11}  {r['rows']:>6}  {r['share_t_ge_0.8']:6.3f}  {r['share_t_ge_0.6']:6.3f}  {r['mean_t']:6.3f}"
              f"  {knobs}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "t_coverage.json").write_text(json.dumps({"epochs": args.epochs, "set": args.set, "methods": results},
                                                     indent=2))
    print(f"wrote {out / 't_coverage.json'}")


if __name__ == "__main__":
    main()
