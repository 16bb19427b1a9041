"""Multi-process training (docs/distributed.md): sharded rollouts, gathered group statistics, the
one-process update plan split over processes, equivalence of a 2-process (gloo) run with the
1-process run, and a killed process followed by ``--resume``.

Tolerance of the equivalence: every metric ``m2`` of the 2-process run and ``m1`` of the 1-process
run satisfy ``|m2 - m1| <= 1e-6 + 1e-4 |m1|`` (the processes evaluate the model on smaller
batches and sum gradients in another order, so values agree up to float rounding).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from diffalign import algorithms
from diffalign.algorithms._rollout import Batch, Shard, group_advantages
from diffalign.models import load_model
from diffalign.runtime.distributed import all_gather_cat, launch_command, own_micro_batches, spread
from diffalign.runtime.trainer import TrainConfig, outside_backbone, train
from test_online_rl import tiny_model
from test_trainer import rows

ATOL, RTOL = 1e-6, 1e-4
PROMPTS = ["two red circles", "a blue square left of a green triangle", "one yellow square"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def brightness(images, prompts, meta=None):
    """A continuous reward, so that no group has zero spread."""
    return images.mean(dim=(1, 2, 3))


def build(method, **kw):
    cfg = algorithms.build_config(method, {"group_size": 4, "batch_size": 12, "num_steps": 3, "micro_batch_size": 4,
                                           "beta": 0.0, **kw})
    _, cls, _ = algorithms.get(method)
    return cls(cfg, reward=brightness)


def close(a, b) -> bool:
    return abs(a - b) <= ATOL + RTOL * abs(a)


# ----- pure pieces --------------------------------------------------------------------------------

def test_shard_parts_cover_the_batch_and_refuse_an_uneven_split():
    parts = [Shard(r, 3).part(12) for r in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match="a batch of 10 samples cannot be split evenly over 3 processes"):
        Shard(0, 3).part(10)


def test_spread_deals_every_micro_batch_once_with_equal_counts():
    items = list("abcde")
    mine = [spread(items, r, 2) for r in range(2)]
    assert len(mine[0]) == len(mine[1]) == 3
    dealt = sorted(x for part in mine for x, share in part if share == 1.0)
    assert dealt == items
    assert mine[1][-1] == ("a", 0.0)  # padding runs a backward pass that contributes nothing


def test_each_way_of_splitting_an_optimiser_step_gives_every_micro_batch_a_total_share_of_one():
    items = list("abcde")
    for split in ("spread", "replicate"):
        parts = [own_micro_batches(items, Shard(r, 2), split) for r in range(2)]
        assert len(parts[0]) == len(parts[1])
        total = {x: 0.0 for x in items}
        for part in parts:
            for x, share in part:
                total[x] += share
        assert total == {x: 1.0 for x in items}, split
    assert own_micro_batches(items, Shard(), "replicate") == [(x, 1.0) for x in items]
    with pytest.raises(ValueError, match="split must be 'shard', 'spread' or 'replicate', got 'halves'"):
        own_micro_batches(items, Shard(0, 2), "halves")


@pytest.mark.parametrize("micro_batch_size,steps_per_epoch", [(4, 1), (1, 2), (12, 3), (8, 1), (5, 2)])
def test_minibatches_split_the_one_process_plan_over_processes(micro_batch_size, steps_per_epoch):
    algo = build("flow_grpo", micro_batch_size=micro_batch_size, steps_per_epoch=steps_per_epoch, timestep_fraction=0.5)
    n = 12
    local = Batch(prompts=[""] * (n // 2), group=None, cond=None, uncond=None, latents=None, log_probs=None, t=None,
                  sde_mask=torch.ones(3, dtype=torch.bool), rewards=None, advantages=None, valid=None, images=None)
    full = Batch(**{**local.__dict__, "prompts": [""] * n})
    one = list(algo.minibatches(full, torch.Generator().manual_seed(3)))
    parts = []
    for rank in range(2):
        algo.shard = Shard(rank, 2)
        parts.append(list(algo.minibatches(local, torch.Generator().manual_seed(3))))
    assert len(parts[0]) == len(parts[1]) == len(one)
    for step, (m1, m_a, m_b) in enumerate(zip(one, *parts)):
        assert len(m_a) == len(m_b) == len(m1), step  # every process runs every micro-batch
        for ref, a, b in zip(m1, m_a, m_b):
            assert a.share + b.share == pytest.approx(1.0)
            assert a.weight == b.weight == ref.weight
            got = ([(int(i), int(j)) for i, j in zip(a.idx, a.steps)] * (a.share > 0)
                   + [(int(i) + n // 2, int(j)) for i, j in zip(b.idx, b.steps)] * (b.share > 0))
            assert sorted(got) == sorted(zip(ref.idx.tolist(), ref.steps.tolist()))  # the same (sample, step) rows
            for m in (a, b):
                assert m.share == 0 or m.share == pytest.approx(len(m.idx) / len(ref.idx))


def test_outside_backbone_names_the_text_encoder_with_and_without_lora():
    from diffalign.runtime.lora import apply_lora, lora_targets

    model = tiny_model()
    assert outside_backbone(model) == [model.text_encoder]
    lora = apply_lora(tiny_model(), 2, 2, lora_targets(model))
    outside = outside_backbone(lora)
    assert len(outside) == 1 and type(outside[0]).__name__ == type(model.text_encoder).__name__


def test_launch_command_runs_diffalign_train_under_accelerate(tmp_path):
    cmd = launch_command(["c.yaml", "epochs=2", "--run-dir", "r"], 2)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("--module"):] == ["--module", "diffalign", "train", "c.yaml", "epochs=2", "--run-dir", "r"]
    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    assert cmd_has(launch_command(["c.yaml"], None, config), "--config_file", str(config))
    with pytest.raises(FileNotFoundError, match="accelerate config file not found"):
        launch_command(["c.yaml"], 2, tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="num_processes must be >= 1, got 0"):
        launch_command(["c.yaml"], 0)


def test_train_refuses_a_bad_launch_before_starting_processes(tmp_path):
    config = write_config(tmp_path / "c.yaml", tmp_path / "no-model")
    for extra, message in ((["--num-processes", "5"], "algorithm.batch_size=12 must be a multiple of the number of "
                                                      "processes (5)"),
                           (["--num-processes", "-1"], "--num-processes must be >= 0, got -1"),
                           (["--accelerate-config", str(tmp_path / "none.yaml")], "accelerate config file not found")):
        out = subprocess.run(cli(config, "--run-dir", tmp_path / "run", *extra), capture_output=True, text=True,
                             env=ENV)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def cmd_has(cmd, flag, value):
    return flag in cmd and cmd[cmd.index(flag) + 1] == value


# ----- a group split over two processes (torch.multiprocessing, gloo) ------------------------------

def _gloo_worker(rank, world, init_file, out, work):
    """One of ``world`` gloo processes: ``work(shard)`` with this process's ``Shard``, saved as ``rank{rank}.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(work(Shard(rank, world, gather=all_gather_cat)), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_collect(directory: Path, work, world: int = 2) -> list:
    """What ``work(shard)`` (a module-level function) returns on each of ``world`` processes, in rank order."""
    torch.multiprocessing.spawn(_gloo_worker, args=(world, str(directory / "rdzv"), str(directory), work), nprocs=world)
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _collect_work(shard):
    res = {}
    for method, kind in (("flow_grpo", "flow"), ("ddpo", "epsilon")):
        algo = build(method, **({"stat_min_count": 4} if method == "ddpo" else {}))
        algo.shard = shard
        model = tiny_model(kind)
        batches = [algo.collect(model, PROMPTS, epoch=e, seed=11 + e) for e in range(2)]
        keys = ("latents", "log_probs", "rewards", "advantages", "group")
        res[method] = {"batch": [{k: getattr(b, k) for k in keys} for b in batches], "info": batches[-1].info,
                       "state": algo.state_dict() if hasattr(algo, "state_dict") else None}
    return res


@pytest.fixture(scope="module")
def split_collect(tmp_path_factory):
    return spawn_collect(tmp_path_factory.mktemp("split"), _collect_work)


def one_process_advantages(algo, rewards: torch.Tensor) -> torch.Tensor:
    """The one-process advantages of an epoch with these rewards (the same code path as ``collect``)."""
    prompts = [p for p in PROMPTS for _ in range(4)]
    view = Batch(prompts=prompts, group=torch.arange(len(PROMPTS)).repeat_interleave(4), cond=None, uncond=None,
                 latents=None, log_probs=None, t=None, sde_mask=None, rewards=rewards, advantages=None,
                 valid=~torch.isnan(rewards), images=None)
    return algo.advantages(view).clamp(-algo.cfg.adv_clip_max, algo.cfg.adv_clip_max)


@pytest.mark.parametrize("method,kind", [("flow_grpo", "flow"), ("ddpo", "epsilon")])
def test_advantages_of_a_group_split_over_processes_equal_the_one_process_ones(split_collect, method, kind):
    kw = {"stat_min_count": 4} if method == "ddpo" else {}
    algo, fresh = build(method, **kw), build(method, **kw)
    model = tiny_model(kind)
    one = [algo.collect(model, PROMPTS, epoch=e, seed=11 + e) for e in range(2)]
    parts = [r[method] for r in split_collect]
    # the batch of 12 = 3 groups of 4 is split 6 / 6: group 1 straddles the two processes
    assert set(parts[0]["batch"][0]["group"].tolist()) & set(parts[1]["batch"][0]["group"].tolist()) == {1}
    for e, b in enumerate(one):
        # each process sampled its rows of the one-process rollout, up to float rounding. For the VP
        # model that rounding is amplified once: DDIM's first step recovers x0 from eps at alpha(1) =
        # 4.9e-5, so eps's float32 ulp (~6e-8) becomes ~1e-3 in x0 (measured 1.8e-3; 1/255 in image
        # space is 7.8e-3 here)
        for key in ("latents", "log_probs", "rewards"):
            got, want = torch.cat([p["batch"][e][key] for p in parts]), getattr(b, key)
            tol = 4e-3 if kind == "epsilon" and key == "latents" else 1e-5 * (1 + want.abs().max())
            assert (got - want).abs().max() <= tol, (e, key, (got - want).abs().max().item())
        # and the advantages are the one-process advantages of those rewards
        rewards = torch.cat([p["batch"][e]["rewards"] for p in parts])
        adv = torch.cat([p["batch"][e]["advantages"] for p in parts])
        torch.testing.assert_close(adv, one_process_advantages(fresh, rewards), atol=1e-6, rtol=1e-5)
        assert adv.abs().max() > 0.1
    info = parts[0]["info"]
    assert info == parts[1]["info"] and all(close(one[-1].info[k], info[k]) for k in
                                            ("reward_mean", "reward_std", "frac_zero_std_groups", "reward_failed"))
    if method == "ddpo":  # the per-prompt tracker saw every sample on every process
        for p in parts:
            assert p["state"]["tracker"].keys() == fresh.state_dict()["tracker"].keys()
            for prompt, hist in fresh.state_dict()["tracker"].items():
                assert p["state"]["tracker"][prompt] == pytest.approx(hist, abs=1e-7)
    else:  # normalising each process's part of group 1 on its own would give other advantages
        r = parts[0]["batch"][0]["rewards"]
        local = group_advantages(r, parts[0]["batch"][0]["group"])
        assert not torch.allclose(local[4:6], parts[0]["batch"][0]["advantages"][4:6], atol=1e-3)


# ----- whole runs: 2 processes (gloo) against 1 ----------------------------------------------------

EPOCHS = 8


def run_config(model_dir, **kw):
    algo = {"group_size": 4, "batch_size": 12, "num_steps": 3, "micro_batch_size": 4, **kw.pop("algorithm", {})}
    return TrainConfig(model=str(model_dir), method="flow_grpo", algorithm=algo, epochs=EPOCHS, checkpoint_every=2,
                       heldout_rewards=["shapes_soft"], eval_every=4, eval_prompts=6, **kw)


def write_config(path, model_dir):
    path.write_text(f"model: {model_dir}\nmethod: flow_grpo\nepochs: {EPOCHS}\ncheckpoint_every: 2\n"
                    "heldout_rewards: [shapes_soft]\neval_every: 4\neval_prompts: 6\n"
                    "algorithm: {group_size: 4, batch_size: 12, num_steps: 3, micro_batch_size: 4}\n")
    return path


def cli(*args):
    return [sys.executable, "-m", "diffalign", "train", *map(str, args)]


def assert_same_metrics(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == y[k] if not isinstance(x[k], float) else close(x[k], y[k]), (x["epoch"], k, x[k], y[k])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    tiny_model("flow").save_pretrained(d / "flow")
    config = write_config(d / "c.yaml", d / "flow")
    one = train(run_config(d / "flow"), d / "one", progress=False)
    out = subprocess.run(cli(config, "--run-dir", d / "two", "--num-processes", 2), capture_output=True, text=True,
                         env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    return d, config, one


@pytest.mark.slow
def test_two_processes_give_the_metrics_and_model_of_one_process(runs):
    d, _, one = runs
    a, b = rows(d / "one"), rows(d / "two")
    assert_same_metrics(a, b)
    assert b[-1]["images_seen"] == EPOCHS * 12 and "eval/heldout_accuracy" in b[3]
    assert {"eval/heldout_relation", "eval/heldout_count"} <= set(b[3])  # summed over processes, equal to one's
    for (k, v), w in zip(load_model(one).state_dict().items(), load_model(d / "two" / "final").state_dict().values()):
        torch.testing.assert_close(v, w, atol=1e-5, rtol=1e-4, msg=k)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the field after the state
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def training_process(launcher: int, rank: int) -> int:
    for pid in descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"diffalign" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"no training process of rank {rank} under {launcher}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the training processes through /proc")
def test_a_killed_process_stops_the_run_and_resume_completes_it(runs):
    d, config, _ = runs
    run_dir = d / "killed"
    p = subprocess.Popen(cli(config, "--run-dir", run_dir, "--num-processes", 2), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # a checkpoint exists (epoch 2)
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.02)
    os.kill(training_process(p.pid, rank=1), signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1
    assert "SIGKILL" in err and "training stopped: a training process failed" in err
    assert f"continue with: diffalign train {config} --run-dir {run_dir} --resume --num-processes 2" in err
    assert len(metrics.read_text().splitlines()) < EPOCHS and not (run_dir / "final").exists()

    shutil.copytree(run_dir, d / "killed-one")
    out = subprocess.run(cli(config, "--run-dir", run_dir, "--resume", "--num-processes", 2), capture_output=True,
                         text=True, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    assert rows(run_dir) == rows(d / "two")  # the same process count: exactly the uninterrupted run
    # a different process count resumes too (the DDP optimiser state is whole on every process)
    train(run_config(d / "flow"), d / "killed-one", resume=True, progress=False)
    assert_same_metrics(rows(d / "one"), rows(d / "killed-one"))
