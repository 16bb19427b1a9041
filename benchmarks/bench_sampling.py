"""Sampler-loop overhead over the bare model calls (target <= 1.05).

Both arms run the same number of forward passes of the same small convolutional model on the
same batch; they alternate A/B within one process so machine noise hits both alike, and the
ratio of medians is printed. Run: `make bench` (or `python benchmarks/bench_sampling.py`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffalign.core import FlowSchedule, VPSchedule, sample


class SmallConvNet(torch.nn.Module):
    """About the size of the shapes-world models: a few 3x3 convolutions at 32x32."""

    def __init__(self, schedule, prediction_type, width=64):
        super().__init__()
        self.schedule, self.prediction_type = schedule, prediction_type
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, 3, 3, padding=1),
        )

    def forward(self, x, t, cond):
        return self.net(x) * (1 + t.view(-1, 1, 1, 1)) + cond.view(-1, 1, 1, 1)


def bare(model, x, cond, uncond, steps, guidance):
    t = torch.full((x.shape[0],), 0.5)
    with torch.no_grad():
        for _ in range(steps):
            if guidance != 1.0:
                model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]))
            else:
                model(x, t, cond)


def looped(model, x, cond, uncond, steps, guidance, sampler):
    sample(model, cond, sampler=sampler, num_steps=steps, noise=x, uncond=uncond, guidance_scale=guidance,
           generator=torch.Generator().manual_seed(0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, {args.steps} steps")
    print(f"{'sampler':<10} {'guidance':>8} {'bare ms':>9} {'loop ms':>9} {'ratio':>7}")
    for sampler, schedule, pred in [("flow_ode", FlowSchedule(), "flow"), ("flow_sde", FlowSchedule(), "flow"),
                                    ("ddim", VPSchedule(), "epsilon")]:
        model = SmallConvNet(schedule, pred).eval()
        x = torch.randn(args.batch, 3, 32, 32)
        cond, uncond = torch.ones(args.batch), torch.zeros(args.batch)
        for guidance in (1.0, 3.0):
            a_times, b_times = [], []
            bare(model, x, cond, uncond, 2, guidance)  # warm-up
            for _ in range(args.repeats):
                t0 = time.perf_counter(); bare(model, x, cond, uncond, args.steps, guidance); a_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter(); looped(model, x, cond, uncond, args.steps, guidance, sampler); b_times.append(time.perf_counter() - t0)
            a, b = statistics.median(a_times), statistics.median(b_times)
            print(f"{sampler:<10} {guidance:>8.1f} {a * 1e3:>9.1f} {b * 1e3:>9.1f} {b / a:>7.3f}")


if __name__ == "__main__":
    main()
