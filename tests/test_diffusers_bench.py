"""The diffusers benchmarks run (tiny sizes on CPU): the same code paths a GPU run takes."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.usefixtures("quiet_diffusers")


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    bench = load("bench_gpu_sd35")
    rows = bench.main(["--tiny", "--json", str(tmp_path / "r.json")])
    assert [r["mode"] for r in rows] == ["lora", "full"]
    lora, full = rows
    assert lora["trainable_params_M"] < full["trainable_params_M"]
    for r in rows:
        assert r["s_per_step"] > 0 and r["tflop_per_step"] > 0 and r["latent"] == [4, 8, 8]
        assert r["floor_s_per_image"] > 0 and r["x_floor"] == pytest.approx(r["s_per_image"] / r["floor_s_per_image"],
                                                                              rel=1e-2)
    assert lora["lora_merged_rollouts"] and not full["lora_merged_rollouts"]
    assert (tmp_path / "r.json").is_file()


def test_gpu_benchmark_builds_the_sd35_medium_config():
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    bench = load("bench_gpu_sd35")
    with torch.device("meta"):  # shapes only: no memory, no init
        transformer = SD3Transformer2DModel(**bench.SD35_MEDIUM_TRANSFORMER)
        vae = AutoencoderKL(**bench.SD35_VAE)
    assert 2.2e9 < sum(p.numel() for p in transformer.parameters()) < 2.3e9
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.latent_channels == 16
    assert transformer.config.joint_attention_dim == bench.SD35_TEXT["dim"]
    assert transformer.config.pooled_projection_dim == bench.SD35_TEXT["pooled"]


@pytest.mark.slow
def test_cpu_benchmark_runs():
    rows = load("bench_diffusers").main(["--size", "tiny", "--arch", "sd", "flux", "wan", "z_image", "--batch", "4",
                                         "--steps", "2",
                                         "--repeats", "1"])
    assert [r["arch"] for r in rows] == ["sd", "flux", "wan", "z_image"]
    assert all(r["ratio"] > 0 and r["images_per_s"] > 0 for r in rows)


def test_wan_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    r = load("bench_gpu_wan").main(["--tiny", "--json", str(tmp_path / "r.json")])
    assert r["latent"] == [16, 3, 4, 4] and r["videos_per_epoch"] == 2 and r["trained_micro_batches"] == 6
    assert r["s_per_video"] > 0 and r["floor_s_per_video"] > 0 and r["ratio"] > 0
    assert (tmp_path / "r.json").is_file()


def test_wan_gpu_benchmark_builds_the_wan21_1_3b_config():
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    bench = load("bench_gpu_wan")
    with torch.device("meta"):
        transformer = WanTransformer3DModel(**bench.WAN21_1_3B)
        vae = AutoencoderKLWan()
    assert 1.40e9 < sum(p.numel() for p in transformer.parameters()) < 1.45e9
    assert transformer.config.text_dim == bench.WAN_TEXT["dim"] and vae.config.z_dim == 16
    assert (vae.config.scale_factor_spatial, vae.config.scale_factor_temporal) == (8, 4)
