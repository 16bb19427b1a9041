"""benchmarks/gpu_scale.py: every run it names is a valid training config at the scaled batch, and
its summary reads the trainer's metrics (the training itself runs on a GPU machine)."""

import importlib.util
import json
import tarfile
from pathlib import Path

import pytest

from diffalign.config import load_config
from diffalign.runtime.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("gpu_scale", ROOT / "benchmarks" / "gpu_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_scale = load()


@pytest.mark.parametrize("name", list(gpu_scale.RUNS))
def test_every_run_is_a_valid_config_at_8x_batch(name):
    config, extra, *pinned = gpu_scale.RUNS[name]
    over = gpu_scale._overrides(config, extra, 8, *pinned)
    cfg = load_config(TrainConfig, ROOT / "configs" / f"{config}.yaml", over)
    shipped = load_config(TrainConfig, ROOT / "configs" / f"{config}.yaml").algorithm
    scale1 = {**shipped, **(pinned[0] if pinned else {})}
    for field in gpu_scale.BATCH_FIELDS:
        if field in scale1 and f"algorithm.{field}" not in extra:
            assert cfg.algorithm[field] == 8 * scale1[field]
    for key, value in extra.items():
        node = cfg
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        assert node == value, key


def test_default_runs_exist_and_an_unknown_run_is_refused(tmp_path, capsys):
    assert set(gpu_scale.DEFAULT_RUNS) <= set(gpu_scale.RUNS)
    import sys
    argv, sys.argv = sys.argv, ["gpu_scale.py", "--runs", "flow_grpo,nope", "--no-smoke", "--out", str(tmp_path)]
    try:
        with pytest.raises(SystemExit):
            gpu_scale.main()
    finally:
        sys.argv = argv
    assert "unknown run(s) ['nope']" in capsys.readouterr().err


def test_pinned_runs_are_the_measured_batch():
    # docs/gpu_scale.md's NFT and CRD rows ran at 512 images per epoch, whatever the shipped config says now
    for name in ("diffusion_nft", "diffusion_nft_lr3e-5", "crd_lr1e-4"):
        config, extra, *pinned = gpu_scale.RUNS[name]
        assert "algorithm.batch_size=512" in gpu_scale._overrides(config, extra, 8, *pinned)


def test_smoke_overrides_make_file_configs_run_without_data():
    for name, over in gpu_scale.SMOKE_OVERRIDES.items():
        cfg = load_config(TrainConfig, ROOT / "configs" / f"{name}.yaml",
                          gpu_scale._args(over))
        assert cfg.algorithm["source"] in ("reference", "policy") and cfg.algorithm["data"] == ""


def test_curve_and_pack_read_a_run_directory(tmp_path):
    run = tmp_path / "runs" / "nft"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest.pt").write_bytes(b"x")
    rows = [{"epoch": 1, "images_seen": 512, "reward_mean": 0.7, "elapsed_s": 3.0},
            {"epoch": 2, "images_seen": 1024, "reward_mean": 0.8, "elapsed_s": 6.0,
             "eval/heldout_accuracy": 0.5, "eval/heldout_score": 0.8}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    c = gpu_scale.curve(run)
    assert c["epochs"] == 2 and c["images"] == 1024 and c["reward_first"] == 0.7 and c["reward_last"] == 0.8
    assert c["evals"] == [{"epoch": 2, "images": 1024, "elapsed_s": 6.0, "acc": 0.5, "score": 0.8, "reward": 0.8}]
    gpu_scale.pack(tmp_path / "runs", {"runs": {"nft": c}}, tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "runs.tgz") as tar:
        names = tar.getnames()
    assert "nft/metrics.jsonl" in names and not any("checkpoints" in n for n in names)
    with tarfile.open(tmp_path / "out" / "final_nft.tgz") as tar:
        assert tar.getnames()[-1].startswith("nft/final")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_training_config_validates(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.method and cfg.epochs > 0
