"""Reward throughput (images/s) at 32x32 on this machine's CPU threads.

Covers the shapes verifier, shapes_soft (forward, and forward+backward), the image
statistics, the learned Bradley-Terry reward, the remote reward (loopback HTTP, batched server)
and the model rewards on *tiny random* checkpoints with the real architectures
(``diffalign.rewards.testing``): those numbers measure the pipeline overhead (tokenising,
differentiable preprocessing, transformers forward), not the speed of the full-size models.

Each row is the best of ``--repeats`` timed calls after one warm-up (the minimum is the least
disturbed by other processes on a shared machine).

``--tasks`` (alone: ``--tasks-only``) adds the task rewards at batch 16 on 512x512 images: GenEval
on tiny random Mask2Former + CLIP checkpoints (the real architectures at small sizes; with random
weights nothing is detected, so a second row forces every query to one class: 16 objects per
image, each colour-classified -- the worst case of the rules), and OCR with the RapidOCR models
shipped in its wheel, reading text rendered with PIL; then OCR accuracy on 64 rendered prompts
of the ``ocr/test`` set (clean, small, noisy).

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_rewards.py [--batch 64] [--repeats 9] [--tasks]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from diffalign import rewards
from diffalign.rewards import testing
from diffalign.worlds import shapes as world


def images_per_s(fn, batch: int, repeats: int) -> float:
    fn()  # warm-up (caches, lazy init)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return batch / min(times)  # best of N: on a shared machine the minimum is the least disturbed run


def task_rewards(batch: int, repeats: int, size: int = 512) -> None:
    """GenEval and OCR throughput at ``batch`` x ``size``^2, and OCR accuracy on rendered text."""
    from diffalign.data import prompt_sets
    from diffalign.rewards.ocr import quoted_text, render_text

    print(f"\ntask rewards: batch {batch}, {size}x{size}, {torch.get_num_threads()} torch threads")
    print(f"{'reward':<44} {'images/s':>10}")

    def row(label: str, fn) -> None:
        print(f"{label:<44} {images_per_s(fn, batch, repeats):>10.2f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        gen = rewards.get("geneval", path=testing.save_tiny_geneval(Path(tmp) / "geneval"))
        meta = [m for m in prompt_sets.metadata("geneval/benchmark") if m["tag"] == "colors"]
        x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        prompts = [m["prompt"] for m in meta[:batch]]
        row("geneval (tiny random; nothing detected)", lambda: gen(x, prompts))
        head = gen.detector.model.class_predictor  # every query -> the first prompt's class, p ~ 1
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(-30.0)
            head.bias[gen.detector.class_names.index(meta[0]["include"][0]["class"])] = 30.0
        row("geneval (tiny; 16 objects/image, colours)", lambda: gen(x, [meta[0]["prompt"]] * batch))
    ocr = rewards.get("ocr", threads=torch.get_num_threads())
    texts = prompt_sets.load("ocr/test")
    prompts = texts[:batch]
    imgs = torch.stack([render_text(quoted_text(p), size=size, seed=i) for i, p in enumerate(prompts)])
    row("ocr (RapidOCR PP-OCRv4, rendered text)", lambda: ocr(imgs, prompts))
    n = 64
    g = torch.Generator().manual_seed(1)
    print(f"\nOCR accuracy on {n} rendered ocr/test prompts ({size}x{size}): mean reward, share read exactly")
    for label, font, noise in (("clean, font 48", 48, 0.0), ("small, font 24", 24, 0.0),
                               ("noisy, font 32, N(0, 0.1^2)", 32, 0.1)):
        ps = texts[batch:batch + n]
        im = torch.stack([render_text(quoted_text(p), size=size, font_size=font, seed=100 + i)
                          for i, p in enumerate(ps)])
        im = (im + noise * torch.randn(im.shape, generator=g)).clamp(0, 1)
        scores = torch.cat([ocr(im[i:i + batch], ps[i:i + batch]) for i in range(0, n, batch)])
        print(f"  {label:<30} {scores.mean().item():.3f}  {(scores == 1).float().mean().item():.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--tasks", action="store_true", help="also the GenEval / OCR rows (batch 16, 512x512)")
    p.add_argument("--tasks-only", action="store_true", help="only the GenEval / OCR rows")
    args = p.parse_args()
    if args.tasks_only:
        return task_rewards(16, min(args.repeats, 3))
    prompts = world.sample_prompts(args.batch, seed=0)
    x = torch.from_numpy(world.render_batch(prompts, seed=0)[0]).permute(0, 3, 1, 2).float() / 255
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, 32x32")
    print(f"{'reward':<26} {'images/s':>10}")

    def row(label: str, fn) -> None:
        print(f"{label:<26} {images_per_s(fn, args.batch, args.repeats):>10.0f}", flush=True)

    for name in ["shapes", "shapes_correct", "shapes_soft", "brightness", "saturation", "colorfulness",
                 "jpeg_compressibility"]:
        r = rewards.get(name)
        with torch.no_grad():
            row(name, lambda r=r: r(x, prompts))
    soft = rewards.get("shapes_soft")

    def soft_backward() -> None:
        xx = x.clone().requires_grad_(True)
        soft(xx, prompts).sum().backward()

    row("shapes_soft (fwd+bwd)", soft_backward)
    with tempfile.TemporaryDirectory() as tmp:
        from diffalign.rewards.learned import make_shapes_pairs, train_bt_reward

        train_bt_reward(make_shapes_pairs(200, seed=0), out=Path(tmp) / "learned", steps=50)
        learned = rewards.get("learned", path=Path(tmp) / "learned")
        with torch.no_grad():
            row("learned", lambda: learned(x, prompts))
        builders = {"clipscore": testing.save_tiny_clip, "pickscore": testing.save_tiny_clip,
                    "aesthetic": testing.save_tiny_aesthetic, "hpsv2": testing.save_tiny_hps,
                    "imagereward": testing.save_tiny_imagereward}
        for name, build in builders.items():
            r = rewards.get(name, path=build(Path(tmp) / name))
            with torch.no_grad():
                row(f"{name} (tiny)", lambda r=r: r(x, prompts))

            def fwd_bwd(r=r) -> None:
                xx = x.clone().requires_grad_(True)
                r(xx, prompts).sum().backward()

            row(f"{name} (tiny, fwd+bwd)", fwd_bwd)
    try:
        from diffalign.rewards.remote import BackgroundServer
    except ImportError:
        BackgroundServer = None
    if BackgroundServer is not None:
        srv = BackgroundServer(rewards.get("shapes"), max_batch=args.batch).start()
        try:
            remote = rewards.get("remote", url=srv.url)
            row("remote shapes (loopback)", lambda: remote(x, prompts))
        finally:
            srv.stop()
    if args.tasks:
        task_rewards(16, min(args.repeats, 3))


if __name__ == "__main__":
    main()
