"""``diffalign sample`` / ``train`` / ``search`` end to end on tiny random diffusers pipelines,
and the trained LoRA back in plain diffusers."""

import json
import logging

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import diffusers  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from diffalign.cli import app  # noqa: E402
from diffalign.core.sampling import seeded_noise  # noqa: E402
from diffalign.models import load_model  # noqa: E402
from diffalign.models.diffusers_adapter import LORA_WEIGHT_NAME, convert_peft_lora  # noqa: E402
from diffalign.runtime.trainer import TrainConfig, train  # noqa: E402
from tiny_pipelines import BUILDERS  # noqa: E402

TIMING = {"sample_s", "train_s", "images_per_s", "elapsed_s"}


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {arch: BUILDERS[arch](root / arch) for arch in ("sd", "sd3", "flux")}


def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def write_config(path, model_dir, method, **kw):
    algo = {"group_size": 2, "batch_size": 4, "num_steps": 3, "micro_batch_size": 4, **kw.pop("algorithm", {})}
    cfg = {"model": str(model_dir), "method": method, "reward": "brightness", "epochs": 2, "lr": 1e-2,
           "checkpoint_every": 1, "algorithm": algo, **kw}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("arch", ["sd", "sd3", "flux"])
def test_cli_sample(pipes, arch, tmp_path):
    res = invoke("sample", "--model", pipes[arch], "--out", tmp_path / "out", "--prompt", "a red cube",
                 "-k", "2", "--steps", "3", "--device", "cpu")
    assert "wrote 2 images" in res.output
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [0, 1] and all(r["prompt"] == "a red cube" for r in rows)
    from PIL import Image

    assert Image.open(tmp_path / "out" / rows[0]["file"]).size == (16, 16)


def pipeline_latents(directory, lora=None, steps=3):
    model = load_model(directory)
    pipe = type(model.pipeline).from_pretrained(directory, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    noise = seeded_noise(model.sample_shape, [0])
    kw = {"max_sequence_length": model.max_sequence_length} if model.max_sequence_length else {}
    latents = model.pack(noise) if model.arch == "flux" else noise
    with torch.no_grad():
        return pipe(prompt=["a red cube"], num_inference_steps=steps, output_type="latent", latents=latents,
                    height=model.height, width=model.width, **kw).images


def diffusers_lora_dir(final, base_dir):
    """``final/lora`` in diffusers' format: written by the trainer when it calls the adapter's
    ``save_lora``; converted from peft's layout otherwise."""
    lora = final / "lora"
    assert (lora / "adapter_config.json").is_file()
    if not (lora / LORA_WEIGHT_NAME).is_file():
        convert_peft_lora(lora, base_dir)
    return lora


@pytest.mark.parametrize("arch,method,extra", [
    ("sd3", "flow_grpo", {"lora_rank": 4, "lora_alpha": 8}),
    ("flux", "flow_grpo", {"lora_rank": 4, "algorithm": {"guidance_scale": 1.0}}),
    ("flux", "dance_grpo", {"lora_rank": 4, "algorithm": {"guidance_scale": 1.0}}),
])
def test_cli_train_lora_and_load_it_in_diffusers(pipes, arch, method, extra, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", pipes[arch], method, **extra)
    res = invoke("train", cfg, "--run-dir", tmp_path / "run")
    final = tmp_path / "run" / "final"
    assert f"final model: {final}" in res.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["reward_failed"] == 0 and 0 < r["reward_mean"] < 1 for r in rows)
    tuned = load_model(final)  # the merged pipeline directory
    assert tuned.arch == arch and (final / "diffalign.json").is_file()
    lora = diffusers_lora_dir(final, pipes[arch])
    base = pipeline_latents(pipes[arch])
    with_lora = pipeline_latents(pipes[arch], lora=lora)
    merged = pipeline_latents(final)
    assert (with_lora - base).abs().max() > 1e-4  # the LoRA changes what plain diffusers generates ...
    assert torch.allclose(with_lora, merged, atol=1e-4)  # ... into what the merged final/ pipeline generates


def test_cli_train_ddpo_full_fine_tune(pipes, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", pipes["sd"], "ddpo", algorithm={"guidance_scale": 2.0})
    invoke("train", cfg, "--run-dir", tmp_path / "run")
    final = tmp_path / "run" / "final"
    base, tuned = load_model(pipes["sd"]), load_model(final)
    diffs = [(v - w).abs().max().item() for v, w in zip(base.state_dict().values(), tuned.state_dict().values())]
    assert max(diffs) > 0
    assert not (final / "lora").exists()
    # frozen components are the source's (hard links or copies), untouched
    assert torch.equal(base.vae.decoder.conv_out.weight, tuned.vae.decoder.conv_out.weight)


def test_resume_is_exact_on_a_diffusers_model(pipes, tmp_path):
    # full fine-tuning with a KL reference (a deep copy of the backbone only)
    cfg = TrainConfig(model=str(pipes["sd3"]), method="flow_grpo", reward="brightness", epochs=3, lr=1e-3,
                      checkpoint_every=1, algorithm={"group_size": 2, "batch_size": 4, "num_steps": 3,
                                                     "micro_batch_size": 2, "beta": 0.04, "guidance_scale": 2.0})
    final = train(cfg, tmp_path / "full", progress=False)
    assert train(cfg, tmp_path / "cut", progress=False, stop_at=2) is None
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)

    def rows(d):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "full") == rows(tmp_path / "cut")
    assert rows(tmp_path / "full")[-1]["kl"] > 0
    a, b = load_model(final), load_model(resumed)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("arch,method", [("sd3", "best_of_n"), ("sd", "smc"), ("flux", "dno")])
def test_cli_search_on_a_diffusers_model(pipes, arch, method, tmp_path):
    if CliRunner().invoke(app, ["search", "--help"]).exit_code != 0:
        pytest.skip("`diffalign search` is not available in this install")
    res = invoke("search", "--method", method, "--budget", 12, "--model", pipes[arch], "--reward", "brightness",
                 "--out", tmp_path / "out", "--prompt", "a red cube", "--steps", 3, "--device", "cpu")
    assert f"{method}: wrote 1 images" in res.output
    assert (tmp_path / "out" / "samples.jsonl").is_file()


@pytest.mark.parametrize("name", ["flow_grpo_sd35", "flow_grpo_flux", "dance_grpo_flux", "ddpo_sd15"])
def test_real_model_configs_are_valid(name):
    from pathlib import Path

    from diffalign import algorithms
    from diffalign.config import load_config

    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    algo = algorithms.build_config(cfg.method, cfg.algorithm)
    assert cfg.mixed_precision == "bf16" and algo.batch_size % algo.group_size == 0
    assert (cfg.lora_rank > 0) and cfg.reward_kwargs.get("path")
