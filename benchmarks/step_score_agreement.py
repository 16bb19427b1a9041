"""How well does a step-wise score rank two candidates of a step by where they lead?

IPR and SPO rank the candidates ``x_{t'}`` drawn from one ``x_t`` by a reward of each one's
predicted ``x_0``; ``step_score: rollout`` ranks them by the reward of their deterministic
continuation to ``t = 0``. For each step of the model's time grid this draws two candidates from
the same state (the policy's SDE step, as IPR does), continues both with the model's own ODE
sampler at the model's guidance, and reports, over the pairs whose final verifier rewards differ,
how often the verifier and ``shapes_soft`` of the predicted ``x_0`` order them the same way (ties
counted apart). The trajectory then goes on from the first candidate.

    python benchmarks/step_score_agreement.py [--model shapes-flow] [--prompts 128] [--steps 6]

docs/algorithms/preference.md, "Round 6".
"""

from __future__ import annotations

import argparse

import torch

from diffalign import rewards
from diffalign.algorithms._policy_gradient import model_prediction_type, model_schedule
from diffalign.algorithms._step_credit import ode_complete, tweedie_x0
from diffalign.core.parametrization import cond_cat, guided_prediction
from diffalign.core.prompts import negative_prompts
from diffalign.core.sampling import seeded_noise
from diffalign.core.steps import get_step
from diffalign.models import load_model
from diffalign.worlds.shapes import sample_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes-flow")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="how many of the grid's steps, from the noisy end")
    ap.add_argument("--eta", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = load_model(args.model).eval()
    d = model.sampling_defaults
    g, n = d["guidance_scale"], args.prompts
    prompts = sample_prompts(n, split="train", seed=args.seed)
    schedule, ptype = model_schedule(model), model_prediction_type(model)
    sde = get_step("flow_sde")
    ts = schedule.timesteps(d["num_steps"])
    cond, uncond = model.encode_prompts(prompts), model.encode_prompts(negative_prompts(prompts))
    cond2, uncond2 = cond_cat(cond, cond), cond_cat(uncond, uncond)
    verifier, soft = rewards.get("shapes"), rewards.get("shapes_soft")
    gen = torch.Generator().manual_seed(1)

    print(f"{args.model}: {n} train-split prompts, guidance {g}, two candidates per state (flow_sde, eta {args.eta})")
    print("| step | t -> t' | pairs whose final rewards differ | verifier(x0_hat) same order | tie | reversed "
          "| shapes_soft(x0_hat) same order |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        x = seeded_noise(model.sample_shape, list(range(n)), "cpu")
        for j in range(min(args.steps, len(ts) - 1)):
            t, t_prev = ts[j], ts[j + 1]
            out = guided_prediction(model, x, t.float().expand(n), cond, uncond, g)
            cand = sde(torch.cat([x, x]), torch.cat([out, out]), t, t_prev, eta=args.eta, generator=gen,
                       schedule=schedule, prediction_type=ptype).prev_sample
            x0_img = model.decode(tweedie_x0(model, cand, t_prev, cond2, uncond2, guidance_scale=g)).float()
            hard, smooth = verifier(x0_img, prompts * 2).view(2, n), soft(x0_img, prompts * 2).view(2, n)
            y = ode_complete(model, cand, ts[j + 1:], cond2, uncond2, sampler=d["sampler"], guidance_scale=g)
            final = verifier(model.decode(y).float(), prompts * 2).view(2, n)
            sign = (final[0] - final[1]).sign()
            differ = sign != 0
            m = int(differ.sum())
            dh, ds = (hard[0] - hard[1]).sign()[differ], (smooth[0] - smooth[1]).sign()[differ]
            same, tie = (dh == sign[differ]).float().mean().item(), (dh == 0).float().mean().item()
            print(f"| {j} | {t.item():.1f} -> {t_prev.item():.1f} | {m} of {n} | {same:.2f} | {tie:.2f} | "
                  f"{max(1 - same - tie, 0.0):.2f} | {(ds == sign[differ]).float().mean().item():.2f} |", flush=True)
            x = cand[:n]


if __name__ == "__main__":
    main()
