"""Online-RL trainer overhead: one Flow-GRPO optimiser step over the raw forward+backward of the
same model on the same batch (target <= 1.15), rollout images/s, and peak memory.

Both arms process the same stored trajectory steps (same x_t, t, prompts, CFG batch), then take
an optimiser step; they alternate A/B in one process. Run: `make bench`.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from diffalign import algorithms
from diffalign.core.parametrization import cond_index, guided_prediction
from diffalign.models import load_model
from diffalign.models.shapes_unet import ShapesDenoiser, default_config
from diffalign.worlds import shapes


def verifier(images, prompts, meta=None):
    return torch.as_tensor(shapes.verify(images, prompts).score, dtype=torch.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="shapes-flow")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    try:
        model = load_model(args.model)
    except (FileNotFoundError, ValueError):
        model = ShapesDenoiser(default_config("flow", list(shapes.VOCAB)))
    model.requires_grad_(False)
    model.unet.requires_grad_(True)
    cfg = algorithms.build_config("flow_grpo", {"batch_size": args.batch, "group_size": 8, "beta": 0.0,
                                                "micro_batch_size": args.batch, "timestep_fraction": 1.0})
    algo = algorithms.get("flow_grpo")[1](cfg, reward=verifier)
    prompts = shapes.sample_prompts(cfg.prompts_per_epoch, "train", seed=0)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-6)

    t0 = time.perf_counter()
    model.eval()
    batch = algo.collect(model, prompts, epoch=0, seed=0)
    t_roll = time.perf_counter() - t0
    model.train()
    micro = next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0))))
    micro = [m for m in micro if bool((m.steps == micro[0].steps[0]).all())]  # one timestep, the whole batch

    def trainer_step():
        for m in micro:
            loss, _ = algo.loss(model, m)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def raw_step():
        for m in micro:
            x_t = batch.latents[m.idx, m.steps]
            t = batch.t[m.steps].float()
            out = guided_prediction(model, x_t, t, cond_index(batch.cond, m.idx), cond_index(batch.uncond, m.idx),
                                    cfg.guidance_scale)
            out.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    raw_step(); trainer_step()  # warm-up
    a, b = [], []
    for _ in range(args.repeats):
        s = time.perf_counter(); raw_step(); a.append(time.perf_counter() - s)
        s = time.perf_counter(); trainer_step(); b.append(time.perf_counter() - s)
    ra, rb = statistics.median(a), statistics.median(b)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, CFG {cfg.guidance_scale}")
    print(f"rollout: {len(batch)} images, {cfg.num_steps} steps in {t_roll:.2f} s = {len(batch) / t_roll:.1f} images/s")
    print(f"raw forward+backward+step: {ra * 1e3:.1f} ms   trainer step: {rb * 1e3:.1f} ms   ratio {rb / ra:.3f}")
    print(f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
