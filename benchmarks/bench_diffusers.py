"""Diffusers adapter overhead on CPU, on small random pipelines of each architecture (built from
configs by tests/tiny_pipelines.py; nothing is downloaded):

- ``images/s`` of ``core.sampling.generate`` (the model's default sampler, ``--steps`` steps, CFG
  where the architecture uses it);
- one policy-gradient train step through the adapter -- ``algorithm.loss`` (guided prediction
  through the adapter, the Gaussian step log-prob, PPO), backward, AdamW step; Flow-GRPO for
  SD3/FLUX, DDPO for SD/SDXL -- over the raw UNet/transformer forward + backward + step on the same
  inputs (CFG batch, FLUX packing, precomputed diffusers-style keyword arguments). Target <= 1.15.

Both arms alternate in one process; medians over ``--repeats``. Run:
``OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_diffusers.py``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_pipelines import BUILDERS  # noqa: E402

from diffalign import algorithms  # noqa: E402
from diffalign.core.parametrization import cfg as apply_cfg  # noqa: E402
from diffalign.core.parametrization import cond_cat, cond_index  # noqa: E402
from diffalign.core.sampling import generate  # noqa: E402
from diffalign.models import load_model  # noqa: E402

METHOD = {"sd": "ddpo", "sdxl": "ddpo", "sd3": "flow_grpo", "flux": "flow_grpo"}
GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "sd3": 4.5, "flux": 1.0}


def brightness(images, prompts, meta=None):
    return images.mean(dim=(1, 2, 3))


def raw_backbone_kwargs(model, x, t, cond):
    """What a hand-written diffusers training step feeds the backbone (computed once, untimed)."""
    b = model.backbone
    if model.arch in ("sd", "sdxl"):
        kw = {"timestep": t * model.schedule.num_train_timesteps - 1, "encoder_hidden_states": cond.embeds}
        if model.arch == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return kw
    if model.arch == "sd3":
        return {"timestep": t * 1000, "encoder_hidden_states": cond.embeds, "pooled_projections": cond.pooled}
    H, W = x.shape[-2:]
    txt_ids, img_ids = model._flux_ids(cond.embeds.shape[1], H, W, x.device, b.dtype)
    return {"timestep": t, "guidance": cond.guidance, "pooled_projections": cond.pooled,
            "encoder_hidden_states": cond.embeds, "txt_ids": txt_ids, "img_ids": img_ids}


def bench_arch(arch: str, directory: Path, args) -> dict:
    model = load_model(directory)
    g = GUIDANCE[arch]
    prompts = [f"prompt number {i}" for i in range(args.batch)]
    defaults = dict(model.sampling_defaults)
    defaults.update(num_steps=args.steps, guidance_scale=g)
    generate(model, prompts[:2], [0, 1], **defaults)  # warm-up
    t0 = time.perf_counter()
    generate(model, prompts, list(range(len(prompts))), **defaults)
    images_per_s = len(prompts) / (time.perf_counter() - t0)

    model.requires_grad_(False)
    model.trainable_module().requires_grad_(True)
    cfg = algorithms.build_config(METHOD[arch], {"batch_size": args.batch, "group_size": 2, "beta": 0.0,
                                                 "num_steps": args.steps, "guidance_scale": g,
                                                 "micro_batch_size": args.batch, "timestep_fraction": 1.0})
    algo = algorithms.get(METHOD[arch])[1](cfg, reward=brightness)
    model.eval()
    batch = algo.collect(model, prompts[: cfg.prompts_per_epoch], epoch=0, seed=0)
    model.train()
    micro = next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0))))
    mid = micro[len(micro) // 2].steps[0]
    micro = [m for m in micro if bool((m.steps == mid).all())]  # one mid-trajectory step, whole batch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    backbone = model.backbone

    inputs = []
    for m in micro:
        x = batch.latents[m.idx, m.steps]
        t = batch.t[m.steps].float()
        cond = cond_index(batch.cond, m.idx)
        if batch.uncond is not None:
            cond = cond_cat(cond, cond_index(batch.uncond, m.idx))
            x2, t2 = torch.cat([x, x]), torch.cat([t, t])
        else:
            x2, t2 = x, t
        inputs.append((x2, raw_backbone_kwargs(model, x2, t2, cond)))

    def raw_step():
        for x, kw in inputs:
            h = model.pack(x) if arch == "flux" else x
            out = backbone(h, return_dict=False, **kw)[0]
            if arch == "flux":
                out = model.unpack(out, *x.shape[-2:])
            if g != 1.0:
                c, u = out.chunk(2)
                out = apply_cfg(c, u, g)
            out.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def trainer_step():
        for m in micro:
            loss, _ = algo.loss(model, m)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    raw_step(), trainer_step()  # warm-up
    a, b = [], []
    for _ in range(args.repeats):
        s = time.perf_counter(); raw_step(); a.append(time.perf_counter() - s)  # noqa: E702
        s = time.perf_counter(); trainer_step(); b.append(time.perf_counter() - s)  # noqa: E702
    ra, rb = statistics.median(a), statistics.median(b)
    n_params = sum(p.numel() for p in params)
    return {"arch": arch, "method": METHOD[arch], "params_M": n_params / 1e6, "latent": model.sample_shape,
            "cfg": g, "images_per_s": images_per_s, "raw_ms": ra * 1e3, "adapter_ms": rb * 1e3, "ratio": rb / ra}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["sd", "sdxl", "sd3", "flux"], choices=sorted(BUILDERS))
    p.add_argument("--size", default="small", choices=["tiny", "small"], help="pipeline size (tests use tiny)")
    p.add_argument("--batch", type=int, default=8, help="images per rollout and per train step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, size {args.size}, batch {args.batch}, "
          f"{args.steps} steps (CPU, float32)")
    print(f"{'arch':6} {'method':10} {'params':>8} {'latent':>12} {'cfg':>4} {'images/s':>9} {'raw ms':>8} "
          f"{'adapter ms':>10} {'ratio':>6}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            d = BUILDERS[arch](Path(tmp) / arch, size=args.size)
            r = bench_arch(arch, d, args)
            rows.append(r)
            print(f"{r['arch']:6} {r['method']:10} {r['params_M']:7.2f}M {str(tuple(r['latent'])):>12} {r['cfg']:4.1f} "
                  f"{r['images_per_s']:9.1f} {r['raw_ms']:8.1f} {r['adapter_ms']:10.1f} {r['ratio']:6.3f}")
    return rows


if __name__ == "__main__":
    main()
