"""Choose SMC / FK steering's potential and lambda on *train*-split prompts (so that
`make bench-search`, on held-out prompts, is not tuned on its own test set).

Prints exact accuracy (verifier) at 4x and 8x samples' worth for best-of-N and each SMC setting.
Run: `python benchmarks/sweep_smc.py` (about 15 minutes on one CPU thread).
"""

from __future__ import annotations

import argparse

import torch

from diffalign import search
from diffalign.models import load_model
from diffalign.worlds import shapes

SETTINGS = [  # (lambda, potential, resample_interval, resample_every)
    (10.0, "max", None, 1), (3.0, "max", None, 1), (1.0, "max", None, 1), (10.0, "difference", None, 1),
    (3.0, "difference", None, 1), (10.0, "max", (5, 10), 1), (10.0, "max", (0, 10), 3), (30.0, "max", (5, 10), 1),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes-flow")
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--budgets", default="4,8", help="samples' worth per image")
    args = p.parse_args()
    model = load_model(args.model)
    prompts = shapes.sample_prompts(args.prompts, "train", seed=5)
    steps = model.sampling_defaults["num_steps"]

    def accuracy(res: search.SearchResult) -> float:
        return float(shapes.verify(res.images, prompts).correct.mean())

    for b in (int(x) for x in args.budgets.split(",")):
        budget = b * steps * len(prompts)
        bon = search.run("best_of_n", model, prompts, "shapes", budget=budget, seed=0)
        print(f"{b}x best_of_n: {accuracy(bon):.3f}", flush=True)
        for lam, potential, interval, every in SETTINGS:
            res = search.run("smc", model, prompts, "shapes", budget=budget, seed=0, lam=lam, potential=potential,
                             resample_interval=interval, resample_every=every)
            print(f"{b}x smc lambda {lam:g} {potential} interval {interval} every {every}: {accuracy(res):.3f} "
                  f"({res.trace['num_resamples']} resamplings)", flush=True)


if __name__ == "__main__":
    main()
