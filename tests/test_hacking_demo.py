"""Reward-hacking demonstration on the shapes world.

Optimising the initial noise of ``shapes-flow`` (ReNO) against a deliberately imperfect learned
Bradley-Terry proxy raises the proxy while the exact verifier falls, and the evaluation report
shows the warning box. The control -- optimising the verifier itself (best-of-N with the exact
``shapes`` reward at a comparable NFE budget) -- raises the verifier without tripping the warning.

Both evaluations are built by hand in the format of ``evaluation.evaluate`` (which only samples
models itself and cannot take search outputs), with the same helpers it uses for every number.
"""

import numpy as np
import pytest
import torch

from diffalign import rewards, search
from diffalign.evaluation import detect_hacking, reward_stats, save_eval, win_rate, within_prompt_diversity
from diffalign.evaluation import write_report
from diffalign.evaluation.evaluator import DEFINITIONS, RESULT_VERSION
from diffalign.evaluation.features import ENCODER_NAME, pooled_pixels, rms_distance
from diffalign.models import load_model
from diffalign.rewards.learned import TRAIN_CORRUPTIONS, make_shapes_pairs, train_bt_reward
from diffalign.worlds import shapes as W

pytestmark = pytest.mark.slow

PROMPTS = W.all_prompts(kind="count")[::10][:6]  # one..four objects, three colours, three shapes
K = 4  # seeds per prompt (2 was too few: the verifier's change on 12 images has SE ~0.04)
STEPS = 6  # sampling steps (few, so back-propagating through the sampler stays cheap)
ITERS = 12  # ReNO iterations = differentiable samples per image (3 is too few: the verifier barely moves)
LR = 40.0  # shipped base, 12 iterations: lr 10 verifier -0.021 at K 2 (SE 0.037) and +0.005 at K 4; lr 20 -0.083
# (SE 0.056); lr 40 -0.151 / -0.111 / -0.076 (SE 0.05-0.055) at sampling seeds 0 / 1 / 2 (the test runs seed 0;
# at K 2 the 12 images made -0.05 only 1.4 standard errors)
# v2 base (K 2): at lr 3 it fell only 0.014 (0.963 -> 0.949), at lr 6, 0.065
WARNING = 'id="reward-hacking-warning"'


def _entry(images, scores, base=None):
    """One model's entry, as ``evaluate`` builds it (FID/KID left out: not needed here)."""
    P = len(PROMPTS)
    flat = [p for p in PROMPTS for _ in range(K)]
    v = W.verify(images, flat)
    entry = {"rewards": {n: reward_stats(s, P, K) for n, s in scores.items()},
             "diversity": within_prompt_diversity(images, P, K),
             "shapes": {"accuracy": W.accuracy_by_category(flat, v.correct), "verifier_score": float(np.mean(v.score))},
             "vs_base": None, "grid": None, "seconds": 0.0}
    if base is not None:
        b_images, b_scores = base
        entry["vs_base"] = {"drift": float(rms_distance(pooled_pixels(images).double(),
                                                        pooled_pixels(b_images).double()).mean()),
                            "fid": None, "kid": None,
                            "win_rate": {n: win_rate(scores[n], b_scores[n]) for n in scores}}
    return entry


def _result(before, after, scorers, target):
    """Evaluation result ``{base: before, optimised: after}`` with ``target`` and the other reward held out."""
    sb = {n: r(before, [p for p in PROMPTS for _ in range(K)]).detach().double().numpy() for n, r in scorers.items()}
    sa = {n: r(after, [p for p in PROMPTS for _ in range(K)]).detach().double().numpy() for n, r in scorers.items()}
    models = {"base": _entry(before, sb), "optimised": _entry(after, sa, base=(before, sb))}
    for m in models.values():
        m["stability"] = m["rewards"][target]["seed_block_std"]
    names = list(scorers)
    return {"version": RESULT_VERSION, "prompts": list(PROMPTS), "seeds_per_prompt": K, "seed": 0,
            "sampling": {"sampler": "flow_ode", "num_steps": STEPS, "guidance_scale": 3.0, "eta": None},
            "rewards": names, "target": target, "heldout": [n for n in names if n != target], "base": "base",
            "shapes_world": True, "encoder": ENCODER_NAME, "grid_prompts": len(PROMPTS), "models": models,
            "definitions": DEFINITIONS}


def _report(result, run_dir):
    save_eval(result, run_dir / "eval" / "eval.json")
    return write_report(run_dir).read_text()


def test_optimising_the_learned_proxy_hacks_it_and_the_report_warns(tmp_path):
    torch.manual_seed(0)
    train = make_shapes_pairs(600, seed=0, corruptions=TRAIN_CORRUPTIONS)
    train_bt_reward(train, out=tmp_path / "proxy", steps=300, seed=0)
    proxy = rewards.get("learned", path=tmp_path / "proxy")
    verifier = rewards.get("shapes")
    scorers = {"learned": proxy, "shapes": verifier}
    model = load_model("shapes-flow")
    N = len(PROMPTS) * K
    kw = dict(num_images_per_prompt=K, num_steps=STEPS, seed=0)

    # "before": the plain samples from the same initial noise ReNO starts from (candidate 0)
    base = search.best_of_n(model, PROMPTS, verifier, budget=N * STEPS, n=1, **kw)
    hacked = search.reno(model, PROMPTS, proxy, budget=N * STEPS * ITERS, lr=LR, **kw)
    assert hacked.prompts == base.prompts == [p for p in PROMPTS for _ in range(K)]
    assert torch.allclose(hacked.trace["reward_by_iteration"][0], proxy(base.images, base.prompts), atol=1e-3)

    hack = _result(base.images, hacked.images, scorers, target="learned")
    b, a = hack["models"]["base"]["rewards"], hack["models"]["optimised"]["rewards"]
    proxy_gain = a["learned"]["mean"] - b["learned"]["mean"]
    verifier_change = a["shapes"]["mean"] - b["shapes"]["mean"]
    print(f"\nReNO on the proxy: learned {b['learned']['mean']:.3f} -> {a['learned']['mean']:.3f}, "
          f"shapes {b['shapes']['mean']:.4f} -> {a['shapes']['mean']:.4f}")
    # the proxy clearly rose: paired per-image gains (same noise) well above their standard error
    gains = (proxy(hacked.images, hacked.prompts) - proxy(base.images, base.prompts)).double()
    print(f"per-image proxy gains: {[round(g, 2) for g in gains.tolist()]}")
    assert proxy_gain > 0 and gains.mean() > 3 * gains.std() / len(gains) ** 0.5
    assert hack["models"]["optimised"]["vs_base"]["win_rate"]["learned"] >= 0.75
    # ... while the verifier fell (not merely stalled)
    assert verifier_change < -0.05
    reasons = detect_hacking(hack)
    assert reasons and any("held-out 'shapes'" in r for r in reasons), reasons
    html = _report(hack, tmp_path / "run_hacked")
    assert WARNING in html and "Possible reward hacking" in html

    # control: optimise the verifier itself at a comparable budget (best-of-N over the same NFE)
    good = search.best_of_n(model, PROMPTS, verifier, budget=N * STEPS * ITERS, **kw)
    ctrl = _result(base.images, good.images, scorers, target="shapes")
    b, a = ctrl["models"]["base"]["rewards"], ctrl["models"]["optimised"]["rewards"]
    print(f"best-of-{ITERS} on the verifier: shapes {b['shapes']['mean']:.4f} -> {a['shapes']['mean']:.4f}, "
          f"learned {b['learned']['mean']:.3f} -> {a['learned']['mean']:.3f}")
    assert a["shapes"]["mean"] > b["shapes"]["mean"]  # the target rose, so the check is live
    # the proxy is imperfect, so it does dip a little where wrong samples are swapped for correct
    # ones (measured -23.2 -> -24.1, a 3.7 % relative drop) -- but stays under the 5 % threshold
    assert detect_hacking(ctrl) == []
    html = _report(ctrl, tmp_path / "run_control")
    assert WARNING not in html and 'class="ok"' in html
