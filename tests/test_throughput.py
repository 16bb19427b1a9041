"""Throughput options and their benchmark: diffusers attention backends as a model option, the
trainer's ``compile_backbone``, and ``benchmarks/bench_throughput.py`` on its quick settings."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from diffalign.runtime.trainer import TrainConfig, Trainer, backbone_of
from test_online_rl import tiny_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_throughput.py"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_pipelines import build_flux, build_sd

    d = tmp_path_factory.mktemp("pipes")
    return {"flux": build_flux(d / "flux"), "sd": build_sd(d / "sd")}


def test_attention_backend_is_a_model_option_where_diffusers_dispatches_it(pipelines):
    from diffalign.core.parametrization import cond_index
    from diffalign.models.diffusers_adapter import DiffusersDenoiser

    default = DiffusersDenoiser.from_pretrained(pipelines["flux"])
    math_sdpa = DiffusersDenoiser.from_pretrained(pipelines["flux"], attention_backend="_native_math")
    procs = [m.processor for m in math_sdpa.backbone.modules() if hasattr(getattr(m, "processor", None),
                                                                        "_attention_backend")]
    assert procs and all(str(getattr(p._attention_backend, "value", p._attention_backend)) == "_native_math"
                         for p in procs)
    cond = default.encode_prompts(["two red circles", "one blue square"])
    x, t = torch.randn(2, *default.sample_shape), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(math_sdpa(x, t, cond_index(cond, slice(None))), default(x, t, cond),
                                   atol=1e-5, rtol=1e-4)


def test_attention_backend_refuses_what_would_do_nothing_or_download(pipelines):
    from diffalign.models.diffusers_adapter import AdapterOptions, DiffusersDenoiser

    with pytest.raises(ValueError, match="UNet2DConditionModel do not dispatch through diffusers' attention backends"):
        DiffusersDenoiser.from_pretrained(pipelines["sd"], attention_backend="_native_math")
    with pytest.raises(ValueError, match="attention_backend='flash_hub' downloads its kernel"):
        AdapterOptions(attention_backend="flash_hub")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        DiffusersDenoiser.from_pretrained(pipelines["flux"], attention_backend="fastest")


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_compile_backbone_compiles_the_backbone_in_place(tmp_path, monkeypatch, lora_rank):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    tiny_model().save_pretrained(tmp_path / "base")
    cfg = TrainConfig(model=str(tmp_path / "base"), compile_backbone=True, lora_rank=lora_rank,
                      algorithm={"group_size": 2, "batch_size": 4, "num_steps": 2, "beta": 0.04})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    model = trainer._trainable_module()
    base = model.get_base_model() if lora_rank else model
    assert len(compiled) == 1 and compiled[0] is base.unet is backbone_of(model)
    frozen = trainer.algorithm.reference.frozen  # full fine-tuning: a copy made before compiling
    assert (frozen is None) == bool(lora_rank) and (frozen is None or frozen.unet is not base.unet)
    assert TrainConfig().compile_backbone is False  # off unless asked: compiling pays on long runs only


def test_the_throughput_benchmark_runs_and_prints_its_ratios(capsys):
    pytest.importorskip("diffusers")
    spec = importlib.util.spec_from_file_location("bench_throughput", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--threads", "1", "--cases", "ddpo_sd", "flow_grpo_shapes"])
    out = capsys.readouterr().out
    assert [r["case"] for r in rows] == ["ddpo_sd", "flow_grpo_shapes"]
    ddpo = rows[0]["arms"]
    assert set(ddpo) == {"floor", "fused", "fused-unmerged", "per-step"} and ddpo["floor"]["ratio"] == 1.0
    for r in rows:
        for arm, a in r["arms"].items():
            assert a["epoch_s"] > 0 and a["ratio"] > 0 and a["images_per_s"] > 0, (r["case"], arm)
    assert "summary (epoch / per-timestep floor, medians)" in out and "ddpo_sd: fused" in out
    assert rows[0]["plan"] == {"chunk": 4, "per_sample": 4, "train_cfg": True}  # quick: 8 images, 2 steps, 4 t
