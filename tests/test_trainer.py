"""The training runtime: a run directory, exact resume, bad input."""

import json
import subprocess
import sys

import pytest
import torch

from diffalign.config import load_config
from diffalign.models import load_model
from diffalign.runtime.trainer import TrainConfig, lr_at, train
from test_online_rl import tiny_model

TIMING = {"sample_s", "train_s", "images_per_s", "elapsed_s"}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    tiny_model("flow").save_pretrained(d / "flow")
    tiny_model("epsilon").save_pretrained(d / "vp")
    return d


def cfg_for(model_dir, method="flow_grpo", **kw):
    algo = {"group_size": 4, "batch_size": 8, "num_steps": 3, "micro_batch_size": 8, **kw.pop("algorithm", {})}
    kw = {"epochs": 4, "checkpoint_every": 2, **kw}
    return TrainConfig(model=str(model_dir), method=method, algorithm=algo, **kw)


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


COSINE = {"lr_schedule": "cosine", "lr_warmup_epochs": 1}


@pytest.mark.parametrize("method,model,extra", [("flow_grpo", "flow", {}), ("ddpo", "vp", {}),
                                                ("flow_grpo", "flow", {"lora_rank": 4}), ("flow_grpo", "flow", COSINE)])
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny_dirs, tmp_path, method, model, extra):
    cfg = cfg_for(tiny_dirs / model, method, **extra)
    final = train(cfg, tmp_path / "full", progress=False)
    assert train(cfg, tmp_path / "cut", progress=False, stop_at=3) is None  # interrupted after epoch 3
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert rows(tmp_path / "full") == rows(tmp_path / "cut")
    a, b = load_model(final), load_model(resumed)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    # the run directory holds what it promises
    assert (tmp_path / "full" / "config.yaml").is_file() and (tmp_path / "full" / "checkpoints" / "latest.pt").is_file()
    assert load_config(TrainConfig, tmp_path / "full" / "config.yaml") == cfg
    assert len(rows(tmp_path / "full")) == 4


def test_lr_schedules_by_hand():
    cos = TrainConfig(method="diffusion_nft", epochs=5, lr=1.0, lr_schedule="cosine", lr_final=0.1)
    assert [round(lr_at(cos, e), 6) for e in range(5)] == [1.0, round(0.1 + 0.9 * (1 + 2**-0.5) / 2, 6), 0.55,
                                                         round(0.1 + 0.9 * (1 - 2**-0.5) / 2, 6), 0.1]
    lin = TrainConfig(method="diffusion_nft", epochs=6, lr=2.0, lr_schedule="linear", lr_final=0.0, lr_warmup_epochs=2)
    assert [lr_at(lin, e) for e in range(6)] == pytest.approx([1.0, 2.0, 2.0, 4 / 3, 2 / 3, 0.0])
    const = TrainConfig(method="diffusion_nft", epochs=3, lr=0.5, lr_warmup_epochs=2)
    assert [lr_at(const, e) for e in range(3)] == [0.25, 0.5, 0.5]


def test_the_trainer_follows_the_schedule(tiny_dirs, tmp_path):
    cfg = cfg_for(tiny_dirs / "flow", lr=1e-3, lr_schedule="linear", lr_final=0.25)
    train(cfg, tmp_path / "run", progress=False)
    assert [r["lr"] for r in rows(tmp_path / "run")] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


@pytest.mark.parametrize("field,value,allowed", [("lr_schedule", "step", "constant"), ("lr_final", 1.5, r"\[0, 1\]"),
                                                 ("lr_warmup_epochs", 4, "")])
def test_bad_schedule_values_name_the_field(field, value, allowed):
    with pytest.raises(ValueError, match=f"{field}.*{allowed}"):
        TrainConfig(method="diffusion_nft", epochs=4, **{field: value})


def test_lora_final_model_differs_from_base_and_saves_the_adapter(tiny_dirs, tmp_path):
    cfg = cfg_for(tiny_dirs / "flow", lora_rank=4, lr=1e-2, algorithm={"beta": 0.04})
    final = train(cfg, tmp_path / "run", progress=False)
    assert (final / "lora" / "adapter_config.json").is_file()
    base, tuned = load_model(tiny_dirs / "flow"), load_model(final)
    diffs = [(v - w).abs().max().item() for v, w in zip(base.state_dict().values(), tuned.state_dict().values())]
    assert max(diffs) > 0


def test_resume_with_a_changed_config_is_refused_unless_forced(tiny_dirs, tmp_path):
    cfg = cfg_for(tiny_dirs / "flow")
    train(cfg, tmp_path / "run", progress=False, stop_at=2)
    changed = cfg_for(tiny_dirs / "flow", lr=5e-4)
    with pytest.raises(ValueError, match=r"config differs from the checkpoint's in \['lr'\]"):
        train(changed, tmp_path / "run", resume=True, progress=False)
    assert train(changed, tmp_path / "run", resume=True, force=True, progress=False).is_dir()


def test_a_finished_run_dir_is_not_overwritten(tiny_dirs, tmp_path):
    cfg = cfg_for(tiny_dirs / "flow")
    train(cfg, tmp_path / "run", progress=False, stop_at=1)
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        train(cfg, tmp_path / "run", progress=False)


def test_failing_rewards_are_counted_and_the_run_continues(tiny_dirs, tmp_path, monkeypatch):
    from diffalign import rewards

    real = rewards.get("shapes")

    class Flaky:
        name, differentiable = "flaky", False

        def __call__(self, images, prompts, meta=None):
            r = real(images, prompts).clone()
            r[0] = float("nan")
            return r

    monkeypatch.setattr(rewards, "get", lambda name, **kw: Flaky() if name == "flaky" else real)
    cfg = cfg_for(tiny_dirs / "flow", reward="flaky")
    train(cfg, tmp_path / "run", progress=False)
    r = rows(tmp_path / "run")
    assert all(row["reward_failed"] == 1 for row in r) and all(torch.isfinite(torch.tensor(row["loss"])) for row in r)


@pytest.mark.parametrize("overrides,message", [
    ({"method": "ppo"}, "method must be one of"),
    ({"algorithm": {"batch_size": 10, "group_size": 4}}, "batch_size=10 must be a multiple of group_size=4"),
    ({"lr": -1.0}, "lr must be in (0, inf), got -1.0"),
])
def test_bad_train_config(overrides, message):
    with pytest.raises(ValueError) as e:
        TrainConfig(**overrides)
    assert message in str(e.value)


def test_unknown_reward_is_a_clear_error(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="unknown reward 'verifier'"):
        train(cfg_for(tiny_dirs / "flow", reward="verifier"), tmp_path / "run", progress=False)


def test_train_cli_runs_a_config_with_overrides(tiny_dirs, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_dirs / 'flow'}\nmethod: dance_grpo\nepochs: 2\n"
                      "algorithm:\n  group_size: 4\n  batch_size: 8\n  num_steps: 3\n")
    out = subprocess.run([sys.executable, "-m", "diffalign", "train", str(config), "epochs=1", "algorithm.eta=0.5",
                          "--run-dir", str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "eta: 0.5" in out.stdout and len(rows(tmp_path / "run")) == 1
    bad = subprocess.run([sys.executable, "-m", "diffalign", "train", str(config), "algorithm.clip=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown config key 'algorithm.clip'" in bad.stderr


def test_max_minutes_ends_the_run_with_a_final_model(tiny_dirs, tmp_path):
    cfg = cfg_for(tiny_dirs / "flow", max_minutes=1e-4)  # ~6 ms: over after the first epoch
    final = train(cfg, tmp_path / "run", progress=False)
    assert len(rows(tmp_path / "run")) == 1 and (final / "model.safetensors").is_file()


def test_with_ema_the_heldout_evaluation_scores_the_ema_weights(tiny_dirs, tmp_path):
    """The logged held-out figures are those of the model ``final/`` holds (the EMA), and the
    evaluation hands the trained weights back to the optimiser untouched."""
    from diffalign.core.sampling import generate
    from diffalign.runtime.sampling import resolve_sampling
    from diffalign.worlds import shapes

    cfg = cfg_for(tiny_dirs / "flow", epochs=2, ema_decay=0.5, lr=1e-2, eval_every=2, eval_prompts=6)
    final = train(cfg, tmp_path / "run", progress=False)
    logged = rows(tmp_path / "run")[-1]
    ema_model = load_model(final)
    prompts = shapes.sample_prompts(6, "heldout", seed=12345)
    with torch.no_grad():
        res = shapes.verify(generate(ema_model, prompts, list(range(6)), **resolve_sampling(ema_model)), prompts)
    assert logged["eval/heldout_score"] == pytest.approx(float(res.score.mean()), abs=1e-9)
    # not vacuous: the trained (checkpointed) weights differ from the EMA that was evaluated
    raw = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=False)["trainable"]
    ema = ema_model.state_dict()
    assert max((raw[k] - ema[k]).abs().max().item() for k in raw) > 1e-4
