"""Flow-GRPO on an SD3.5-medium-sized model, for a GPU machine: seconds per image of an epoch against
its raw per-timestep floor, peak memory and TFLOP/s, for LoRA and full fine-tuning.

The MMDiT-X transformer (2.24B parameters) and the 16-channel VAE are built from SD3.5-medium's
published configs with random weights (nothing is downloaded); the three text encoders are
replaced by random prompt embeddings of SD3's shapes (77 CLIP + 256 T5 tokens x 4096, pooled 2048)
-- they run once per prompt and are cached, so they are not part of a training step. Everything
else is diffalign's real path: the diffusers adapter (``DiffusersDenoiser``) around a
``StableDiffusion3Pipeline``, Flow-GRPO's rollout (``flow_sde``, CFG 4.5, 10 steps, group size
``G``, LoRA merged into the weights while sampling unless ``--no-merge``), VAE decode, reward, the
timestep-fused PPO update (``--micro-batch`` rows of image x timestep per pass) with the KL to the
reference model, backward, gradient clipping and AdamW -- in bf16 autocast like ``Trainer`` (LoRA
weights and full fine-tuning master weights in float32, frozen weights in bf16).

One "step" is one epoch of ``--prompts x G`` images: a rollout, then one optimiser step over every
image and trained timestep. The floor (``floor_per_image``) is what a loop calling the raw
transformer once per timestep must spend per image: ``T`` guided forwards, one guided
forward+backward per trained timestep and, with ``beta > 0``, one guided reference forward per
trained timestep, timed at the run's own batch sizes; ``x_floor`` = seconds per image / floor
(target <= 1.2). TFLOP/s counts the matmul / attention / convolution FLOPs of an epoch
(``torch.utils.flop_counter``) over its wall time.

    python benchmarks/bench_gpu_sd35.py                # GPU: 512x512, LoRA r=32 and full fine-tuning
    python benchmarks/bench_gpu_sd35.py --tiny         # CPU smoke run of the same code (tested)

On this workplace's GPU machines (torch, transformers, peft and accelerate installed; diffusers not):
``benchmarks/gpu_wheels.sh`` fetches the wheels into ``.whl/`` here; a device run carries ``.whl`` and
starts with ``python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1`` (docs/gpu_scale.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
import zlib
from pathlib import Path

import torch

# SD3.5-medium (stabilityai/stable-diffusion-3.5-medium, transformer/config.json and vae/config.json)
SD35_MEDIUM_TRANSFORMER = dict(
    attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=tuple(range(13)), in_channels=16,
    joint_attention_dim=4096, num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2,
    pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128)
SD35_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False)
SD35_TEXT = {"tokens": 77 + 256, "dim": 4096, "pooled": 2048}

TINY_TRANSFORMER = dict(
    attention_head_dim=8, caption_projection_dim=32, dual_attention_layers=(0,), in_channels=4,
    joint_attention_dim=32, num_attention_heads=4, num_layers=2, out_channels=4, patch_size=2,
    pooled_projection_dim=64, pos_embed_max_size=16, qk_norm="rms_norm", sample_size=8)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
    norm_num_groups=4, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False)
TINY_TEXT = {"tokens": 12, "dim": 32, "pooled": 64}


def build_model(device: torch.device, tiny: bool, resolution: int, grad_checkpointing: bool):
    """A ``DiffusersDenoiser`` around an SD3 pipeline with random weights and no text encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from diffalign.models.diffusers_adapter import AdapterOptions, DiffusersCond, DiffusersDenoiser

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU directly: 2.24B parameters init in seconds there
        transformer = SD3Transformer2DModel(**(TINY_TRANSFORMER if tiny else SD35_MEDIUM_TRANSFORMER))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD35_VAE))
    if dtype != torch.float32:
        transformer, vae = transformer.to(dtype), vae.to(dtype)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    opts = AdapterOptions(resolution=resolution, gradient_checkpointing=grad_checkpointing, decode_batch_size=8)
    model = DiffusersDenoiser(pipe, options=opts)
    text = TINY_TEXT if tiny else SD35_TEXT

    @torch.no_grad()
    def encode(prompts):  # stands in for the text encoders: a fixed random embedding per prompt
        rows, pooled = [], []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            rows.append(torch.randn(text["tokens"], text["dim"], generator=g))
            pooled.append(torch.randn(text["pooled"], generator=g))
        return DiffusersCond(torch.stack(rows).to(device, dtype), torch.stack(pooled).to(device, dtype))

    model._encode = encode
    return model


def brightness(images, prompts, meta=None):
    return images.float().mean(dim=(1, 2, 3))


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def floor_per_image(model, batch, algo_cfg, args, device, sync) -> dict:
    """The raw per-timestep floor of one image's epoch, from timed raw backbone calls on the epoch's
    own latents and prompts: ``T`` guided forwards of its rollout, one guided forward+backward per
    trained timestep, and one guided forward per trained timestep for the KL's reference when
    ``beta > 0`` -- each at the batch the run uses (the rollout's sampling batch, ``--micro-batch``
    rows), per image."""
    from diffalign.core.parametrization import cond_cat, cond_index

    backbone = model.get_base_model().backbone if hasattr(model, "get_base_model") else model.backbone
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = base.compute_dtype

    def inputs(n):
        idx = torch.arange(n) % len(batch)
        x = batch.latents[idx, 1].to(dtype)
        cond = cond_cat(cond_index(batch.cond, idx), cond_index(batch.uncond, idx))
        x2, t2 = torch.cat([x, x]), batch.t[1].float().expand(2 * n).to(device)
        return x2, {"timestep": base._timestep(t2), "encoder_hidden_states": cond.embeds.to(dtype),
                    "pooled_projections": cond.pooled.to(dtype)}  # what SD3's pipeline feeds its transformer

    def timed(fn, reps):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t0) / reps

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    n_sample = min(algo_cfg.sample_batch_size, algo_cfg.batch_size)
    xs, kws = inputs(n_sample)
    xt, kwt = inputs(args.micro_batch)

    def forward():
        with torch.no_grad(), autocast():
            backbone(xs, return_dict=False, **kws)

    def forward_backward():
        with autocast():
            out = backbone(xt, return_dict=False, **kwt)[0]
        out.float().square().mean().backward()

    reps = 3 if device.type == "cuda" else 1
    fwd = timed(forward, reps) / n_sample  # one guided step of one image (both CFG branches)
    fb = timed(forward_backward, reps) / args.micro_batch
    backbone.zero_grad(set_to_none=True)
    T, trained = algo_cfg.num_steps, max(1, round(algo_cfg.timestep_fraction * algo_cfg.num_steps))
    per_image = T * fwd + trained * fb + (trained * fwd if algo_cfg.beta > 0 else 0.0)
    return {"floor_forward_ms_per_image_step": round(fwd * 1e3, 2),
            "floor_fwd_bwd_ms_per_image_step": round(fb * 1e3, 2), "floor_s_per_image": round(per_image, 4)}


def pick_device(name: str | None, tiny: bool) -> torch.device:
    """The benchmark's device (CUDA unless ``tiny``), TF32 matmuls on, diffusers' logging quiet."""
    device = torch.device(name or ("cpu" if tiny or not torch.cuda.is_available() else "cuda"))
    if device.type != "cuda" and not tiny:
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine (use --tiny for a CPU smoke run)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # e.g. "modules that should be kept in float32: []" on .to(bf16)
    return device


def run_arm(mode: str, args, device: torch.device) -> dict:
    from diffalign import algorithms
    from diffalign.runtime.lora import Reference, apply_lora, lora_targets, merged_lora

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(device, args.tiny, args.resolution, args.grad_checkpointing)
    model.requires_grad_(False)
    torch.manual_seed(0)
    if mode == "lora":
        model = apply_lora(model, args.lora_rank, args.lora_alpha, lora_targets(model))
        lr = 3e-4
    else:
        model.trainable_module().requires_grad_(True)  # float32 master weights
        lr = 1e-5
    params = [p for p in model.parameters() if p.requires_grad]
    algo_cfg = algorithms.build_config("flow_grpo", {
        "group_size": args.group_size, "batch_size": args.group_size * args.prompts, "num_steps": args.steps,
        "guidance_scale": 4.5, "eta": 0.7, "beta": args.beta, "clip_range": 1e-4,
        "micro_batch_size": args.micro_batch, "timestep_fraction": 1.0,
        "sample_batch_size": args.sample_batch or args.group_size * args.prompts})
    reference = Reference(model) if args.beta > 0 else None
    algo = algorithms.get("flow_grpo")[1](algo_cfg, reward=brightness, reference=reference)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    backbone = model.get_base_model().backbone if mode == "lora" else model.backbone
    if args.compile:
        backbone.compile()  # in place, as the trainer's compile_backbone does

    def autocast():  # what Trainer does: bf16 autocast on CUDA, nothing on CPU
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    merge = mode == "lora" and not args.no_merge

    def epoch(e: int) -> tuple[float, float]:
        prompts = [f"prompt {e} {i}" for i in range(args.prompts)]
        sync()
        t0 = time.perf_counter()
        model.eval()
        with autocast(), (merged_lora(model) if merge else contextlib.nullcontext()):
            batch = algo.collect(model, prompts, epoch=e, seed=e)
        sync()
        t1 = time.perf_counter()
        model.train()
        for micro_batches in algo.minibatches(batch, torch.Generator().manual_seed(e)):
            for micro in micro_batches:
                with autocast():
                    loss, _ = algo.loss(model, micro)
                (loss / len(micro_batches)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        epoch.batch = batch
        return t1 - t0, time.perf_counter() - t1

    t0 = time.perf_counter()
    first = sum(epoch(0))  # warm-up (and, with --compile, compilation)
    warmup_s = time.perf_counter() - t0
    times = [epoch(e + 1) for e in range(args.epochs)]
    roll = sorted(t[0] for t in times)[len(times) // 2]
    train = sorted(t[1] for t in times)[len(times) // 2]
    step = roll + train
    flops = count_flops(lambda: epoch(args.epochs + 1)) if not args.compile else float("nan")
    n_images = algo_cfg.batch_size
    out = {
        "mode": mode, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
        "resolution": args.resolution, "latent": list(model.sample_shape),
        "trainable_params_M": round(sum(p.numel() for p in params) / 1e6, 2),
        "images_per_step": n_images, "sampling_steps": args.steps, "micro_batch_rows": args.micro_batch,
        "sample_batch": algo_cfg.sample_batch_size, "beta": args.beta, "lora_merged_rollouts": merge,
        "compiled": args.compile, "warmup_epoch_s": round(warmup_s, 2), "first_epoch_s": round(first, 2),
        "rollout_s": round(roll, 3), "train_s": round(train, 3), "s_per_step": round(step, 3),
        "s_per_image": round(step / n_images, 4), "rollout_images_per_s": round(n_images / roll, 2),
        "tflop_per_step": float(f"{flops / 1e12:.4g}"), "tflop_per_s": float(f"{flops / 1e12 / step:.4g}"),
    }
    if device.type == "cuda":
        out["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    out.update(floor_per_image(model, epoch.batch, algo_cfg, args, device, sync))
    out["x_floor"] = round(out["s_per_image"] / out["floor_s_per_image"], 3)
    del model, algo, opt, reference
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny SD3 config, 16x16 images, on CPU: a smoke run")
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 512; --tiny: 16)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="G, images per prompt")
    p.add_argument("--steps", type=int, default=10, help="sampling steps (Flow-GRPO trains with 10)")
    p.add_argument("--micro-batch", type=int, default=4,
                   help="rows (image x timestep) per forward/backward, fused over timesteps (CFG doubles it)")
    p.add_argument("--sample-batch", type=int, default=0, help="images per sampling pass (0: the whole epoch)")
    p.add_argument("--no-merge", action="store_true", help="roll out with the LoRA adapter unmerged")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (warm-up epoch compiles)")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no reference forward)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lora-alpha", type=float, default=64)
    p.add_argument("--epochs", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.resolution is None:
        args.resolution = 16 if args.tiny else 512
    if args.tiny and args.group_size == 8 and args.prompts == 2:
        args.group_size, args.prompts, args.steps, args.micro_batch, args.epochs = 2, 2, 3, 6, 1
        args.lora_rank, args.lora_alpha = 4, 8
    device = pick_device(args.device, args.tiny)
    rows = []
    for mode in args.modes:
        try:
            r = run_arm(mode, args, device)
        except torch.cuda.OutOfMemoryError:
            r = {"mode": mode, "error": f"CUDA out of memory at --micro-batch {args.micro_batch}; rerun with a "
                                        f"smaller --micro-batch or --grad-checkpointing"}
            torch.cuda.empty_cache()
        rows.append(r)
        print(json.dumps(r))
    print(f"\n{'mode':5} {'trainable':>10} {'s/step':>8} {'rollout s':>9} {'train s':>8} {'s/image':>8} "
          f"{'floor s/img':>11} {'x floor':>8} {'TFLOP/s':>8} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:5} {r['error']}")
            continue
        print(f"{r['mode']:5} {r['trainable_params_M']:9.2f}M {r['s_per_step']:8.2f} {r['rollout_s']:9.2f} "
              f"{r['train_s']:8.2f} {r['s_per_image']:8.3f} {r['floor_s_per_image']:11.3f} {r['x_floor']:8.3f} "
              f"{r['tflop_per_s']:8.3g} {r.get('peak_memory_GiB', math.nan):9.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
