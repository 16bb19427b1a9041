"""Diffusers adapter overhead on CPU, on small random pipelines of each architecture (built from
configs by tests/tiny_pipelines.py; nothing is downloaded):

- ``images/s`` of ``core.sampling.generate`` (the model's default sampler, ``--steps`` steps, CFG
  where the architecture uses it);
- one policy-gradient train step through the adapter -- ``algorithm.loss`` (guided prediction
  through the adapter, the Gaussian step log-prob, PPO), backward, AdamW step; Flow-GRPO for the
  flow-matching families, DDPO for the VP ones (SD, SDXL, CogVideoX) -- over the raw
  UNet/transformer forward + backward + step on the same inputs (the CFG batch and the backbone's
  keyword arguments -- packed tokens, position ids, text masks, conditioning latents -- computed
  once, untimed; the output unpacked and guided). Target <= 1.15.

Both arms alternate in one process; medians over ``--repeats``. Run:
``make bench-diffusers`` (or ``OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_diffusers.py``).
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

from tiny_pipelines import all_builders  # noqa: E402

from diffalign import algorithms  # noqa: E402
from diffalign.core.parametrization import cond_cat, cond_index, guidance_rule  # noqa: E402
from diffalign.core.prompts import Prompt  # noqa: E402
from diffalign.core.sampling import generate  # noqa: E402
from diffalign.models import load_model  # noqa: E402
from diffalign.models.diffusers_adapter import AdapterOptions, DiffusersDenoiser  # noqa: E402

BUILDERS = all_builders()
# classifier-free guidance each family trains with (1: a guidance-distilled or step-distilled model)
GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "sd3": 4.5, "flux": 1.0, "flux_kontext": 1.0, "wan": 5.0, "wan_i2v": 5.0,
            "hunyuan_video": 1.0, "cogvideox": 6.0, "qwen_image": 4.0, "qwen_image_edit": 4.0, "flux2": 1.0,
            "flux2_klein": 4.0, "z_image": 6.0, "sana": 4.5}
ORIGINAL = ["sd", "sdxl", "sd3", "flux"]


def brightness(images, prompts, meta=None):
    return images.flatten(1).mean(1)


def load(arch: str, directory) -> DiffusersDenoiser:
    if isinstance(directory, Path):
        return load_model(directory)
    directory.set_progress_bar_config(disable=True)  # an in-memory pipeline (Qwen-Image-Edit)
    return DiffusersDenoiser(directory, options=AdapterOptions(resolution=32))


def bench_prompts(model, n: int, tmp: Path) -> list[str]:
    texts = [f"prompt number {i}" for i in range(n)]
    if not model.images_per_prompt[0]:
        return texts
    import numpy as np
    from PIL import Image

    path = tmp / "source.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (model.height, model.width, 3), np.uint8)).save(path)
    return [Prompt(t, [str(path)]) for t in texts]


def bench_arch(arch: str, directory, args, tmp: Path) -> dict:
    model = load(arch, directory)
    g = GUIDANCE[arch]
    method = "ddpo" if model.schedule.kind == "vp" else "flow_grpo"
    prompts = bench_prompts(model, args.batch, tmp)
    defaults = dict(model.sampling_defaults)
    defaults.update(num_steps=args.steps, guidance_scale=g)
    generate(model, prompts[:2], [0, 1], **defaults)  # warm-up
    t0 = time.perf_counter()
    generate(model, prompts, list(range(len(prompts))), **defaults)
    images_per_s = len(prompts) / (time.perf_counter() - t0)

    model.requires_grad_(False)
    model.trainable_module().requires_grad_(True)
    cfg = algorithms.build_config(method, {"batch_size": args.batch, "group_size": 2, "beta": 0.0,
                                           "num_steps": args.steps, "guidance_scale": g,
                                           "micro_batch_size": args.batch, "timestep_fraction": 1.0})
    algo = algorithms.get(method)[1](cfg, reward=brightness)
    model.eval()
    batch = algo.collect(model, prompts[: cfg.prompts_per_epoch], epoch=0, seed=0)
    model.train()
    micro = next(iter(algo.minibatches(batch, torch.Generator().manual_seed(0))))
    mid = micro[len(micro) // 2].steps[0]
    micro = [m for m in micro if bool((m.steps == mid).all())]  # one mid-trajectory step, whole batch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    backbone = model.backbone
    combine = guidance_rule(model)

    inputs = []
    with torch.no_grad():
        for m in micro:
            x = batch.latents[m.idx, m.steps]
            t = batch.t[m.steps].float()
            cond = cond_index(batch.cond, m.idx)
            if batch.uncond is not None:
                cond = cond_cat(cond, cond_index(batch.uncond, m.idx))
                x2, t2 = torch.cat([x, x]), torch.cat([t, t])
            else:
                x2, t2 = x, t
            inputs.append((x2, model._inputs(x2, t2, cond)))

    def raw_step():
        for x, kw in inputs:
            out = model._output(backbone(**kw, return_dict=False)[0], x)
            if g != 1.0:
                c, u = out.chunk(2)
                out = combine(c, u, g)
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
    return {"arch": arch, "method": method, "params_M": n_params / 1e6, "latent": model.sample_shape,
            "cfg": g, "images_per_s": images_per_s, "raw_ms": ra * 1e3, "adapter_ms": rb * 1e3, "ratio": rb / ra}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=list(BUILDERS), choices=sorted(BUILDERS),
                   help=f"architectures (default: all; the first four: {' '.join(ORIGINAL)})")
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
    print(f"{'arch':15} {'method':10} {'params':>8} {'latent':>15} {'cfg':>4} {'images/s':>9} {'raw ms':>8} "
          f"{'adapter ms':>10} {'ratio':>6}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            d = BUILDERS[arch](Path(tmp) / arch, size=args.size)
            r = bench_arch(arch, d, args, Path(tmp))
            rows.append(r)
            print(f"{r['arch']:15} {r['method']:10} {r['params_M']:7.2f}M {str(tuple(r['latent'])):>15} "
                  f"{r['cfg']:4.1f} {r['images_per_s']:9.1f} {r['raw_ms']:8.1f} {r['adapter_ms']:10.1f} "
                  f"{r['ratio']:6.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
