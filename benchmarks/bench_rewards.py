"""Reward throughput (images/s) at 32x32 on this machine's CPU threads.

Covers the shapes verifier, shapes_soft (forward, and forward+backward), the image
statistics, the learned Bradley-Terry reward, the remote reward (loopback HTTP, batched server)
and the model rewards on *tiny random* checkpoints with the real architectures
(``diffalign.rewards.testing``): those numbers measure the pipeline overhead (tokenising,
differentiable preprocessing, transformers forward), not the speed of the full-size models.

Each row is the best of ``--repeats`` timed calls after one warm-up (the minimum is the least
disturbed by other processes on a shared machine).

Run: ``OMP_NUM_THREADS=2 python benchmarks/bench_rewards.py [--batch 64] [--repeats 9]``.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
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
        return
    srv = BackgroundServer(rewards.get("shapes"), max_batch=args.batch).start()
    try:
        remote = rewards.get("remote", url=srv.url)
        row("remote shapes (loopback)", lambda: remote(x, prompts))
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
