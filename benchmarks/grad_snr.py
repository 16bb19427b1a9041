"""Gradient signal-to-noise of an online-RL estimator on a shapes base model: the cosine between
the full-batch gradients of independent epochs (different prompts and noise, same weights).

If the estimator's mean gradient is ``g`` and one epoch's estimate is ``g + noise`` with noise
variance ``s^2 / n``, the expected cosine of two independent estimates is about
``|g|^2 / (|g|^2 + s^2 / n)``: near 0 means one epoch's gradient is mostly noise.

Run: ``python benchmarks/grad_snr.py --method flow_grpo --reward shapes --batch 64`` (about a
minute per 6 batches of 64 on 2 CPU threads). Prints the mean and std of the pairwise cosines and
the mean gradient norm (a pure-noise gradient's norm falls as 1/sqrt(batch)).
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from diffalign import algorithms
from diffalign.models import load_model
from diffalign.rewards import get
from diffalign.runtime.lora import Reference
from diffalign.worlds import shapes

FORWARD_PROCESS = ("awm", "diffusion_nft", "crd")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-flow")
    p.add_argument("--method", default="flow_grpo")
    p.add_argument("--reward", default="shapes")
    p.add_argument("--batch", type=int, default=64, help="images per epoch (8 per prompt)")
    p.add_argument("--num-batches", type=int, default=6)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG of the rollouts and the loss (default: the model's own sampling default; "
                        "the v1 figures of docs/algorithms/step_credit.md were measured at 3.0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.model)
    model.requires_grad_(False)
    model.trainable_module().requires_grad_(True)
    params = [q for q in model.parameters() if q.requires_grad]
    guidance = args.guidance_scale
    if guidance is None:
        guidance = float(model.sampling_defaults.get("guidance_scale", 1.0))
    opts = {"group_size": 8, "batch_size": args.batch, "num_steps": 10, "guidance_scale": guidance,
            "micro_batch_size": 64}
    if args.method not in FORWARD_PROCESS:  # the policy-gradient family: the demo's SDE settings, no KL
        opts.update(eta=0.7, clip_range=1e-3, beta=0.0, timestep_fraction=1.0)
    if args.method == "vard":  # its value is fitted on each epoch's own rollouts inside collect: no warm-up here
        opts.update(value_warmup_epochs=0, beta=0.1)
    cfg = algorithms.build_config(args.method, opts)
    reference = Reference(model) if getattr(cfg, "beta", 0) > 0 else None
    algo = algorithms.get(args.method)[1](cfg, reward=get(args.reward), reference=reference)

    def gradient(seed: int) -> torch.Tensor:
        prompts = shapes.sample_prompts(args.batch // 8, "train", seed=seed)
        batch = algo.collect(model.eval(), prompts, epoch=0, seed=seed)
        for q in params:
            q.grad = None
        for step in algo.minibatches(batch, torch.Generator().manual_seed(seed)):
            for micro in step:
                loss, _ = algo.loss(model, micro)
                (loss / len(step)).backward()
        return torch.cat([q.grad.flatten() for q in params]).clone()

    grads = [gradient(100 + i) for i in range(args.num_batches)]
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(grads, 2)]
    norm = float(torch.stack(grads).norm(dim=1).mean())
    print(f"{args.method} / {args.reward}, guidance {guidance}, {args.batch} images per epoch, {args.num_batches} epochs: "
          f"pairwise cosine {np.mean(cos):+.3f} +- {np.std(cos):.3f}, gradient norm {norm:.3e}")


if __name__ == "__main__":
    main()
