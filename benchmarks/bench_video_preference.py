"""DenseDPO and VideoDPO on tiny random video pipelines (tests/tiny_video.py; nothing is downloaded).

How aligned DenseDPO's pairs are (tiny Wan 2.1): the mean absolute latent difference between the two
denoised copies of a pair, against that between a copy and a video from independent noise, per
``corrupt_t``. It learns (tiny CogVideoX): each method trained on frame brightness and on its negation, full fine-tuning, 4
on-policy pairs per epoch; mean frame brightness of fixed-seed DDIM samples before and after, on all
frames and on the last segment's (decoded frames 5-8). The settings of the slow test
``test_it_learns_a_per_frame_reward_and_its_negation_moves_the_other_way``; the table is in
docs/algorithms/preference.md.

    OMP_NUM_THREADS=1 python benchmarks/bench_video_preference.py [--epochs 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_video import build_cogvideox, build_wan  # noqa: E402

from diffalign import algorithms, rewards  # noqa: E402
from diffalign.core.sampling import generate, sample, seeded_noise  # noqa: E402
from diffalign.models import load_model  # noqa: E402
from diffalign.runtime.lora import Reference  # noqa: E402
from diffalign.runtime.prompts import PromptsConfig  # noqa: E402
from diffalign.runtime.trainer import TrainConfig, train  # noqa: E402

PROMPTS = ["a red cube", "two blue balls", "a cat walks", "a dog runs"]
SEEDS = list(range(100, 108))


class Darkness:
    name = "darkness"

    def __call__(self, images, prompts, meta=None):
        return 1 - rewards.get("brightness")(images, prompts)


def luma(model) -> tuple[float, float, float]:
    """Mean frame brightness of the fixed-seed samples, of their last 4 frames, and its standard error."""
    v = generate(model.eval(), PROMPTS * 2, SEEDS, sampler="ddim", num_steps=4)
    frame = (0.299 * v[:, :, 0] + 0.587 * v[:, :, 1] + 0.114 * v[:, :, 2]).mean((2, 3))  # [B, F]
    per_video = frame.mean(1)
    return frame.mean().item(), frame[:, 5:].mean().item(), (per_video.std() / len(per_video) ** 0.5).item()


def alignment(model_dir: Path) -> None:
    model = load_model(model_dir).requires_grad_(False)
    noise = seeded_noise(model.sample_shape, range(1000, 1000 + len(PROMPTS)))
    independent = sample(model, model.encode_prompts(PROMPTS), noise=noise, sampler="flow_ode", num_steps=4).x0
    P = len(PROMPTS)
    for t_c in (0.4, 0.6, 0.8):
        cfg = algorithms.build_config("dense_dpo", {"num_steps": 4, "guidance_scale": 1.0, "pairs_per_epoch": P,
                                                    "source": "policy", "corrupt_t": t_c})
        algo = algorithms.get("dense_dpo")[1](cfg, reward=rewards.get("brightness"), reference=Reference(model))
        x0 = algo.collect(model, PROMPTS, epoch=0, seed=5).x0
        pair, other = (x0[:P] - x0[P:]).abs().mean().item(), (x0[:P] - independent).abs().mean().item()
        print(f"corrupt_t {t_c}: pair {pair:.3f}, independent {other:.3f} (ratio {pair / other:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rewards.register("darkness", Darkness, overwrite=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        alignment(build_wan(root / "wan"))
        model_dir = build_cogvideox(root / "cogvideox")
        (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        b = luma(load_model(model_dir))
        print(f"base: brightness {b[0]:.4f}, last segment {b[1]:.4f} (standard error {b[2]:.4f})")
        print("| method | trained on | brightness | last segment | train CPU s |")
        for method in ("dense_dpo", "video_dpo"):
            extra = {"metrics": ["saturation"]} if method == "video_dpo" else {}
            for reward in ("brightness", "darkness"):
                cfg = TrainConfig(model=str(model_dir), method=method, reward=reward, epochs=args.epochs, lr=2e-3,
                                  checkpoint_every=1000, prompts=PromptsConfig(file=str(root / "prompts.txt")),
                                  algorithm={"num_steps": 4, "guidance_scale": 1.0, "pairs_per_epoch": 4,
                                             "micro_batch_size": 4, "beta": 5000.0, "source": "policy",
                                             "inner_epochs": 2, **extra})
                t0 = time.process_time()
                final = train(cfg, root / f"{method}_{reward}", progress=False)
                cpu = time.process_time() - t0
                a = luma(load_model(final))
                print(f"| {method} | {reward} | {a[0]:.4f} | {a[1]:.4f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
