"""Flow-GRPO on a Wan-2.1-1.3B-sized video model, for a GPU machine: time per video and peak memory
of one epoch with LoRA, against the raw forward + backward floor of the same transformer calls.

The transformer (1.42B parameters: 30 blocks, 12 heads x 128, FFN 8960, patch (1, 2, 2)) and the
video VAE are built from Wan2.1-T2V-1.3B-Diffusers' published configs with random weights (nothing
is downloaded); the UMT5 text encoder is replaced by random prompt embeddings of its shape (512
tokens x 4096; text is encoded once per prompt and cached, so it is not part of a step).
Everything else is diffalign's real path: the diffusers adapter around a ``WanPipeline`` at 480p
(480 x 832), 33 frames (latent 16 x 9 x 60 x 104: 14,040 tokens), Flow-GRPO's rollout (``flow_sde``,
CFG 4.5, ``--steps`` steps, ``G`` videos per prompt), VAE decode to frames, a per-frame reward, the
PPO loss, backward through LoRA (r 32) and AdamW, in bf16 autocast as ``Trainer`` runs it.

The floor is the raw transformer alone on the same inputs: the rollout's forward passes (one per
step, CFG batch) plus one forward + backward per trained (micro-batch, step), timed separately and
summed; ``ratio`` = epoch time / floor (the rest is VAE decode, reward, log-probs, PPO, optimiser).

    python benchmarks/bench_gpu_wan.py                 # GPU: 480p, 33 frames, bf16, LoRA
    python benchmarks/bench_gpu_wan.py --tiny          # CPU smoke run of the same code (tested)

The GPU machine has no network: carry diffusers (and diffalign) as wheels
(``pip wheel diffusers==0.42.1 --no-deps -w wheels/``) and install them there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_sd35 import count_flops, pick_device  # noqa: E402

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json (the VAE is AutoencoderKLWan's defaults)
WAN21_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_TEXT = {"tokens": 512, "dim": 4096}
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32)
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
TINY_TEXT = {"tokens": 16, "dim": 32}


def build_model(device: torch.device, tiny: bool, resolution: list[int], frames: int, grad_checkpointing: bool):
    """A ``DiffusersDenoiser`` around a Wan pipeline with random weights and no text encoder."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    from diffalign.models.diffusers_adapter import AdapterOptions, DiffusersCond, DiffusersDenoiser

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        transformer = WanTransformer3DModel(**(TINY if tiny else WAN21_1_3B))
        vae = AutoencoderKLWan(**(TINY_VAE if tiny else {}))
    transformer, vae = transformer.to(dtype), vae.to(dtype)
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=sched)
    opts = AdapterOptions(resolution=resolution, num_frames=frames, gradient_checkpointing=grad_checkpointing,
                          decode_batch_size=1)
    model = DiffusersDenoiser(pipe, options=opts)
    text = TINY_TEXT if tiny else WAN_TEXT

    @torch.no_grad()
    def encode(prompts):  # stands in for UMT5: a fixed random embedding per prompt
        rows = [torch.randn(text["tokens"], text["dim"], generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                for p in prompts]
        return DiffusersCond(torch.stack(rows).to(device, dtype))

    model._encode = encode
    return model


def brightness(images, prompts, meta=None):  # a cheap per-video reward: the mean of every frame
    return images.float().flatten(1).mean(1)


def timed(fn, device, repeats: int = 3) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def run(args, device: torch.device) -> dict:
    from diffalign import algorithms
    from diffalign.core.parametrization import cond_cat
    from diffalign.core.sampling import seeded_noise
    from diffalign.runtime.lora import apply_lora, lora_targets

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(device, args.tiny, args.resolution, args.frames, args.grad_checkpointing)
    model.requires_grad_(False)
    torch.manual_seed(0)
    peft_model = apply_lora(model, args.lora_rank, args.lora_alpha, lora_targets(model))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    videos = args.group_size * args.prompts
    algo_cfg = algorithms.build_config("flow_grpo", {
        "group_size": args.group_size, "batch_size": videos, "num_steps": args.steps, "guidance_scale": 4.5,
        "eta": 0.7, "beta": 0.0, "clip_range": 1e-3, "micro_batch_size": args.micro_batch,
        "timestep_fraction": args.timestep_fraction})
    algo = algorithms.get("flow_grpo")[1](algo_cfg, reward=brightness)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    n_micro = 0

    def epoch(e: int) -> tuple[float, float]:
        nonlocal n_micro
        prompts = [f"prompt {e} {i}" for i in range(args.prompts)]
        sync()
        t0 = time.perf_counter()
        peft_model.eval()
        with autocast():
            batch = algo.collect(peft_model, prompts, epoch=e, seed=e)
        sync()
        t1 = time.perf_counter()
        peft_model.train()
        n_micro = 0
        for micro_batches in algo.minibatches(batch, torch.Generator().manual_seed(e)):
            for micro in micro_batches:
                with autocast():
                    loss, _ = algo.loss(peft_model, micro)
                (loss / len(micro_batches)).backward()
                n_micro += 1
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        return t1 - t0, time.perf_counter() - t1

    flops = count_flops(lambda: epoch(0)) if args.flops else float("nan")
    times = [epoch(e + 1) for e in range(args.epochs)]
    roll = statistics.median(t[0] for t in times)
    train = statistics.median(t[1] for t in times)

    # the floor: the raw transformer on the same shapes (CFG batches), forward for the rollout,
    # forward + backward for each trained micro-batch
    backbone = model.backbone
    cond = model.encode_prompts(["a"])
    x_roll = seeded_noise(model.sample_shape, list(range(2 * videos)), device).to(backbone.dtype)
    x_train = x_roll[: 2 * args.micro_batch]
    t = torch.full((x_roll.shape[0],), 0.5, device=device)

    def raw(x, grad: bool):
        with autocast(), (contextlib.nullcontext() if grad else torch.no_grad()):
            c = cond_cat(*[cond] * x.shape[0])
            out = backbone(**model._inputs(x, t[: x.shape[0]], c), return_dict=False)[0]
            if grad:
                out.float().square().mean().backward()

    t_fwd = timed(lambda: raw(x_roll, False), device)
    t_fwd_bwd = timed(lambda: raw(x_train, True), device)
    opt.zero_grad(set_to_none=True)
    floor = args.steps * t_fwd + n_micro * t_fwd_bwd
    step = roll + train
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
        "resolution": args.resolution, "frames": args.frames, "latent": list(model.sample_shape),
        "transformer_params_M": round(sum(p.numel() for p in backbone.parameters()) / 1e6, 1),
        "lora_params_M": round(sum(p.numel() for p in params) / 1e6, 2),
        "videos_per_epoch": videos, "sampling_steps": args.steps, "trained_micro_batches": n_micro,
        "rollout_s": round(roll, 3), "train_s": round(train, 3), "s_per_epoch": round(step, 3),
        "s_per_video": round(step / videos, 3), "floor_s_per_video": round(floor / videos, 3),
        "ratio": round(step / floor, 3), "raw_forward_s": round(t_fwd, 4), "raw_forward_backward_s": round(t_fwd_bwd, 4),
        "tflop_per_epoch": float(f"{flops / 1e12:.4g}"),
    }
    if device.type == "cuda":
        out["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny Wan config, 32x32 pixels, on CPU: a smoke run")
    p.add_argument("--resolution", type=int, nargs=2, default=None, help="H W (default 480 832; --tiny: 32 32)")
    p.add_argument("--frames", type=int, default=None, help="default 33 (--tiny: 9)")
    p.add_argument("--prompts", type=int, default=1, help="prompts per epoch")
    p.add_argument("--group-size", type=int, default=4, help="G, videos per prompt (Flow-GRPO's Wan run: 4)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (Flow-GRPO's Wan run: 20)")
    p.add_argument("--timestep-fraction", type=float, default=0.95, help="trained steps (19 of 20)")
    p.add_argument("--micro-batch", type=int, default=1, help="rows (video x step) per forward/backward (CFG doubles it)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lora-alpha", type=float, default=64)
    p.add_argument("--epochs", type=int, default=1, help="timed epochs after one warm-up epoch")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--flops", action="store_true", help="count the warm-up epoch's FLOPs (slower)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    args.resolution = list(args.resolution or ([32, 32] if args.tiny else [480, 832]))
    args.frames = args.frames or (9 if args.tiny else 33)
    if args.tiny:
        args.group_size, args.steps, args.lora_rank, args.lora_alpha = 2, 3, 4, 8
        args.timestep_fraction = 1.0
    device = pick_device(args.device, args.tiny)
    try:
        r = run(args, device)
    except torch.cuda.OutOfMemoryError:
        r = {"error": "CUDA out of memory; rerun with --grad-checkpointing"}
    print(json.dumps(r))
    if "error" not in r:
        print(f"\n{r['frames']} frames {r['resolution'][0]}x{r['resolution'][1]}, {r['videos_per_epoch']} videos, "
              f"{r['sampling_steps']} steps: {r['s_per_epoch']:.2f} s/epoch = {r['s_per_video']:.2f} s/video "
              f"(floor {r['floor_s_per_video']:.2f}, ratio {r['ratio']:.2f}); peak "
              f"{r.get('peak_memory_GiB', math.nan):.1f} GiB")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
