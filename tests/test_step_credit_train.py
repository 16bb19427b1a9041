"""The step-credit methods in the runtime: it learns, ``--resume`` is exact, LoRA on diffusers pipelines,
rollouts split over processes equal the one-process rollouts, a 2-process run equals the 1-process run,
and the HTML report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffalign import algorithms
from diffalign.algorithms._rollout import Shard
from diffalign.models import load_model
from diffalign.runtime.lora import Reference
from diffalign.runtime.prompts import PromptsConfig
from diffalign.runtime.trainer import TrainConfig, train
from test_online_rl import PROMPTS, tiny_model
from test_trainer import rows

# settings that fit the tiny models' 4-step trajectories (the shipped configs use 10 steps)
SMALL = {"dense_grpo": {}, "dense_grpo_tweedie": {}, "tp_grpo": {"window_size": 4},
         "g2rpo": {"branch_window": [0, 3], "granularities": [1, 2]},
         "b2_diffurl": {"initial_interval": 2, "progressive_epochs": 6}, "prdp": {},
         "vard": {"value_warmup_epochs": 1, "value_steps": 10, "value_batch": 64}}
METHODS = [m for m in SMALL if m != "dense_grpo_tweedie"]  # the preset shares everything but the scoring


def algo_cfg(method, **kw):
    beta = {} if method == "vard" else {"beta": 0.0}
    return {"group_size": 4, "batch_size": 8, "num_steps": 4, "micro_batch_size": 8, **beta, **SMALL[method], **kw}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    tiny_model("flow").save_pretrained(d / "flow")
    return d / "flow"


# ----- it learns -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", list(SMALL))
def test_it_learns_to_raise_a_reward_on_fixed_prompts(tmp_path, method):
    """A CI-sized run raises the brightness of fixed-seed ODE samples of the training prompts clearly above
    the base model's (the same construction as the Flow-GRPO family's test, tests/test_online_rl.py)."""
    from diffalign import rewards
    from diffalign.core.sampling import generate

    base_dir = tmp_path / "base"
    tiny_model("flow").save_pretrained(base_dir)
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("\n".join(PROMPTS) + "\n")
    algo = algo_cfg(method, group_size=8, batch_size=16, micro_batch_size=16, guidance_scale=1.0)
    cfg = TrainConfig(model=str(base_dir), method=method, reward="brightness", algorithm=algo, epochs=12, lr=3e-3,
                      prompts=PromptsConfig(file=str(pfile)), checkpoint_every=100)
    final = train(cfg, tmp_path / "run", progress=False)
    reward = rewards.get("brightness")

    def score(model_dir):
        model = load_model(model_dir).eval()
        with torch.no_grad():
            images = generate(model, PROMPTS * 8, list(range(16)), num_steps=4, guidance_scale=1.0)
        return reward(images, PROMPTS * 8).mean().item()

    base, tuned = score(base_dir), score(final)
    print(f"{method}: brightness {base:.3f} -> {tuned:.3f}")
    assert tuned > base + 0.1, (base, tuned)


# ----- resume, report --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_resume_gives_the_same_metrics_and_model_as_an_uninterrupted_run(tiny_dir, tmp_path, method):
    cfg = TrainConfig(model=str(tiny_dir), method=method, reward="brightness", algorithm=algo_cfg(method), epochs=4,
                      checkpoint_every=2, lr=1e-3)
    final = train(cfg, tmp_path / "full", progress=False)
    assert train(cfg, tmp_path / "cut", progress=False, stop_at=3) is None
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert rows(tmp_path / "full") == rows(tmp_path / "cut")
    for (k, v), w in zip(load_model(final).state_dict().items(), load_model(resumed).state_dict().values()):
        assert torch.equal(v, w), k
    if method == "dense_grpo":  # the HTML report of a step-credit run, like any other
        from diffalign.evaluation.report import write_report

        page = write_report(tmp_path / "full").read_text()
        assert "Training curves" in page and "dense_grpo" in page


# ----- diffusers pipelines with LoRA -----------------------------------------------------------------

@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_pipelines import BUILDERS

    root = tmp_path_factory.mktemp("pipelines")
    return {arch: BUILDERS[arch](root / arch) for arch in ("sd3", "sd")}


@pytest.mark.slow
@pytest.mark.parametrize("method,arch", [(m, "sd3") for m in METHODS] + [("b2_diffurl", "sd"), ("prdp", "sd")])
def test_lora_training_on_a_diffusers_pipeline(pipes, tmp_path, method, arch):
    """Each method trains a LoRA on a tiny random pipeline (SD3: flow; SD 1.x: DDIM for the methods that
    take any sampler) and the merged final model generates something else than the base."""
    from diffalign.core.sampling import generate

    extra = {"sampler": "ddim", "eta": 1.0} if arch == "sd" else {}
    algo = algo_cfg(method, group_size=2, batch_size=4, micro_batch_size=4, num_steps=3, guidance_scale=2.0,
                    **({"branch_window": [0, 2]} if method == "g2rpo" else {}),
                    **({"window_size": 3} if method == "tp_grpo" else {}), **extra)
    cfg = TrainConfig(model=str(pipes[arch]), method=method, reward="brightness", algorithm=algo, epochs=2,
                      lr=1e-2, lora_rank=4, checkpoint_every=1)
    final = train(cfg, tmp_path / "run", progress=False)
    r = rows(tmp_path / "run")
    assert len(r) == 2 and all(row["reward_failed"] == 0 and 0 < row["reward_mean"] < 1 for row in r)
    assert (final / "lora" / "adapter_config.json").is_file()
    from diffalign.runtime.sampling import resolve_sampling

    with torch.no_grad():
        base, tuned = (generate(m, ["a red cube"], [0], **resolve_sampling(m, num_steps=3))
                       for m in (load_model(pipes[arch]), load_model(final)))
    assert (base - tuned).abs().max() > 1e-4


# ----- N processes -----------------------------------------------------------------------------------

def brightness(images, prompts, meta=None):
    return images.mean(dim=(1, 2, 3))


SPLIT_PROMPTS = ["two red circles", "a blue square left of a green triangle", "one yellow square"]


def build_split(method, model, **kw):
    # prdp needs whole groups on each process: groups of 2, 3 on each
    group = {"group_size": 2} if method == "prdp" else {}
    cfg = algorithms.build_config(method, {**algo_cfg(method), "batch_size": 12, "num_steps": 3, "micro_batch_size": 4,
                                           **group, **kw,
                                           **({"window_size": 3} if method == "tp_grpo" else {}),
                                           **({"branch_window": [0, 2]} if method == "g2rpo" else {})})
    ref = Reference(model) if cfg.beta > 0 else None
    return algorithms.get(method)[1](cfg, reward=brightness, reference=ref)


KEYS = ("latents", "log_probs", "rewards", "advantages", "group", "next_latents", "step_rewards")


def _collect_work(shard):
    res = {}
    for method in METHODS:
        model = tiny_model("flow")
        algo = build_split(method, model)
        algo.shard = shard
        batches = [algo.collect(model, SPLIT_PROMPTS, epoch=e, seed=11 + e) for e in range(2)]
        res[method] = {"batch": [{k: getattr(b, k) for k in KEYS} for b in batches],
                       "state": algo.state_dict() if hasattr(algo, "state_dict") else None}
    return res


@pytest.fixture(scope="module")
def split_collect(tmp_path_factory):
    from test_distributed import spawn_collect

    return spawn_collect(tmp_path_factory.mktemp("split"), _collect_work)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_rollouts_split_over_two_processes_equal_the_one_process_rollouts(split_collect, method):
    """12 samples in groups of 4 split 6 / 6 (a group straddles the processes; prdp: groups of 2, which it
    needs whole): each process holds its rows of
    the one-process batch -- trunks, branches, intermediate rewards and per-step advantages included -- and
    the algorithm state (calibrated noise levels, the value function) is the same on both."""
    model = tiny_model("flow")
    algo = build_split(method, model)
    one = [algo.collect(model, SPLIT_PROMPTS, epoch=e, seed=11 + e) for e in range(2)]
    parts = [r[method] for r in split_collect]
    for e, b in enumerate(one):
        for key in KEYS:
            if getattr(b, key) is None:
                assert all(p["batch"][e][key] is None for p in parts)
                continue
            got, want = torch.cat([p["batch"][e][key] for p in parts]), getattr(b, key)
            fin = torch.isfinite(want) if want.is_floating_point() else torch.ones_like(want, dtype=torch.bool)
            assert torch.equal(fin, torch.isfinite(got) if got.is_floating_point() else fin), (e, key)
            tol = 1e-4 if key in ("advantages", "step_rewards") else 1e-5
            assert (got[fin] - want[fin]).abs().max() <= tol * (1 + want[fin].abs().max()), (method, e, key)
    if method == "vard":  # one value function: the averaged gradient gives both processes the same update
        for k, v in parts[0]["state"]["value"].items():
            torch.testing.assert_close(v, parts[1]["state"]["value"][k])
    elif parts[0]["state"] is not None:
        assert parts[0]["state"] == parts[1]["state"]


def test_prdp_refuses_processes_that_cut_a_group():
    algo = build_split("prdp", tiny_model(), group_size=4)
    algo.shard = Shard(0, 2, gather=lambda t: t)
    with pytest.raises(ValueError, match="batch_size / processes = 6 must be a multiple of group_size=4"):
        algo.collect(tiny_model(), SPLIT_PROMPTS, epoch=0, seed=0)


@pytest.mark.slow
def test_two_processes_train_like_one(tiny_dir, tmp_path):
    """``diffalign train --num-processes 2`` with G2RPO (branches, next_latents, per-step advantages) gives the
    1-process run's metrics and model up to float rounding."""
    from test_distributed import ENV, assert_same_metrics

    algo = {**algo_cfg("g2rpo"), "batch_size": 12, "num_steps": 3, "micro_batch_size": 4, "branch_window": [0, 1],
            "eta": 1.0}  # early, noisy branches: a reward spread that float rounding cannot reorder
    cfg = TrainConfig(model=str(tiny_dir), method="g2rpo", reward="brightness", algorithm=algo, epochs=3,
                      checkpoint_every=3, lr=1e-3)
    one = train(cfg, tmp_path / "one", progress=False)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": str(tiny_dir), "method": "g2rpo", "reward": "brightness", "epochs": 3,
                                  "checkpoint_every": 3, "lr": 1e-3, "algorithm": algo}))
    out = subprocess.run([sys.executable, "-m", "diffalign", "train", str(config), "--run-dir", str(tmp_path / "two"),
                          "--num-processes", "2"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    # policy_loss is the mean of A * ratio over the epoch's samples, which is exactly 0 for group-centred
    # advantages at ratio 1: what remains (~1e-6) is float rounding, compared absolutely
    # (with beta = 0 the loss is that mean too)
    assert [abs(x.pop(k) - y.pop(k)) < 1e-5 for x, y in zip(a, b) for k in ("policy_loss", "loss")] == [True] * 6
    assert_same_metrics(a, b)
    for (k, v), w in zip(load_model(one).state_dict().items(),
                         load_model(tmp_path / "two" / "final").state_dict().values()):
        torch.testing.assert_close(v, w, atol=1e-5, rtol=1e-4, msg=k)


# ----- make bench-efficiency ----------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_efficiency_counts_the_evaluations_dense_rewards_cost(tiny_dir, tmp_path):
    """The benchmark on a tiny model (one method per call, merged into one table): DenseGRPO's sampling costs
    the rollout's evaluations plus its ODE completions, counted by the backbone hook."""
    root = Path(__file__).resolve().parents[1]
    common = ["--images", "16", "--eval-every-images", "8", "--eval-prompts", "2", "--threads", "1",
              "--out", str(tmp_path), "--set", f"model={tiny_dir}", "algorithm.batch_size=8", "algorithm.group_size=4",
              "algorithm.num_steps=3", "algorithm.guidance_scale=1.0", "algorithm.micro_batch_size=8"]
    for method in ("flow_grpo", "dense_grpo"):
        out = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_efficiency.py"), "--methods", method,
                              *common], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "efficiency.json").read_text())
    grpo, dense = summary["methods"]["flow_grpo"], summary["methods"]["dense_grpo"]
    assert [c["images"] for c in dense["curve"]] == [0, 8, 16] and "flow_grpo_best" in summary
    assert grpo["nfe_sample_per_image"] == 3  # 3 steps, no CFG
    # + the completions of x_{t_0}, x_{t_1}, x_{t_2} on every 2nd grid point: 2 + 1 + 1
    assert dense["nfe_sample_per_image"] == 3 + 4 and dense["scored_per_image"] == 4
    assert "NFE/img sample" in out.stdout and "dense_grpo" in out.stdout
