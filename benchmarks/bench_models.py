"""Shapes-world base models: sampling images/s at batch 64 with guidance (10 and 20 steps; target
>= 30 images/s at 10 steps), and the pretraining loss curve shipped beside the weights.

Run: `make bench` (or `python benchmarks/bench_models.py`).
"""

from __future__ import annotations

import json
import time

import torch

from diffalign.core import generate
from diffalign.models import SHORT_NAMES, WEIGHTS_DIR, load_model
from diffalign.worlds import shapes


def main() -> None:
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    prompts = shapes.sample_prompts(64, "heldout", seed=0)
    for name in SHORT_NAMES:
        if not (WEIGHTS_DIR / name / "model.safetensors").is_file():
            print(f"{name}: weights not shipped, skipped")
            continue
        model = load_model(name)
        d = model.sampling_defaults
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        for steps in (10, 20):
            generate(model, prompts[:8], list(range(8)), **{**d, "num_steps": 2})  # warm-up
            times = []
            for r in range(3):
                t0 = time.perf_counter()
                generate(model, prompts, list(range(64)), **{**d, "num_steps": steps})
                times.append(time.perf_counter() - t0)
            best = sorted(times)[1]
            print(f"{name}: {n_params:.2f}M params, {d['sampler']}, guidance {d['guidance_scale']}, "
                  f"{steps} steps, batch 64: {64 / best:.1f} images/s")
        for stage, file in (("stage 1", "stage1_metrics.jsonl"), ("stage 2", "pretrain_metrics.jsonl")):
            metrics = WEIGHTS_DIR / name / file
            if metrics.is_file():
                rows = [json.loads(line) for line in metrics.read_text().splitlines()]
                n = len(rows)
                marks = [rows[i] for i in sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})]
                curve = ", ".join(f"step {r['step']}: {r['loss']:.4f}" for r in marks)
                print(f"{name}: pretraining loss ({stage}, {rows[-1]['elapsed_s']:.0f} s) {curve}")


if __name__ == "__main__":
    main()
