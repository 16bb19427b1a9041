"""One epoch of an online method and of a preference method with LoRA on every wave-2 family
(tiny random pipelines), the trained LoRA reloaded by plain diffusers: the pipeline with the LoRA
generates what the merged ``final/`` pipeline generates, and differs from the base."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from diffalign.core.sampling import seeded_noise  # noqa: E402
from diffalign.models import load_model  # noqa: E402
from diffalign.models.diffusers_adapter import LORA_WEIGHT_NAME, AdapterOptions, DiffusersDenoiser  # noqa: E402
from diffalign.runtime import trainer as trainer_module  # noqa: E402
from diffalign.runtime.prompts import PromptsConfig  # noqa: E402
from diffalign.runtime.trainer import TrainConfig, train  # noqa: E402
from pipeline_reference import REFERENCE  # noqa: E402

FAMILIES = ["wan", "wan_i2v", "hunyuan_video", "cogvideox", "flux_kontext", "qwen_image", "flux2", "flux2_klein",
            "z_image", "sana"]


pytestmark = pytest.mark.usefixtures("quiet_diffusers")


def prompt_file(directory, model):
    """A prompts file for the model: plain lines, or JSONL lines with a conditioning image."""
    texts = ["a red cube", "two blue balls"]
    f = directory / "prompts.jsonl"
    if model.images_per_prompt[0]:
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (model.height, model.width, 3), dtype=np.uint8)).save(directory / "s.png")
        f.write_text("".join(json.dumps({"prompt": t, "image": "s.png"}) + "\n" for t in texts))
    else:
        f.write_text("\n".join(texts) + "\n")
    return f


def method_config(model, online: bool) -> tuple[str, dict]:
    if not online:
        return "dpo", {"pairs_per_epoch": 2, "group_size": 2, "num_steps": 2, "micro_batch_size": 4,
                       "guidance_scale": 1.0}
    if model.schedule.kind == "vp":  # CogVideoX: the epsilon / v path
        return "ddpo", {"batch_size": 4, "group_size": 2, "num_steps": 2, "micro_batch_size": 4, "guidance_scale": 1.0}
    return "flow_grpo", {"batch_size": 4, "group_size": 2, "num_steps": 2, "micro_batch_size": 4,
                         "guidance_scale": 1.0, "beta": 0.0}


def train_lora(model_dir, model, online, tmp_path):
    method, algo = method_config(model, online)
    cfg = TrainConfig(model=str(model_dir), method=method, reward="brightness", epochs=1, lr=3e-2, lora_rank=4,
                      lora_alpha=8, checkpoint_every=1, algorithm=algo,
                      prompts=PromptsConfig(file=str(prompt_file(tmp_path, model))))
    final = train(cfg, tmp_path / "run", progress=False)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward_failed"] == 0 and 0 < row.get("reward_mean", row.get("chosen_reward", 0.5)) < 1, row
    assert (final / "lora" / LORA_WEIGHT_NAME).is_file()  # diffusers' layout, written by the trainer
    return final


@pytest.mark.slow
@pytest.mark.parametrize("online", [True, False], ids=["online", "preference"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_one_epoch_with_lora_and_reload_through_plain_diffusers(tiny_pipeline, arch, online, tmp_path):
    source = tiny_pipeline(arch)
    model = load_model(source)
    final = train_lora(source, model, online, tmp_path)
    from diffalign.core.prompts import Prompt

    prompts = ["a red cube"]
    if model.images_per_prompt[0]:
        prompts = [Prompt("a red cube", [str(tmp_path / "s.png")])]
    noise = seeded_noise(model.sample_shape, [0])
    g = 1.0 if arch == "flux2" else 2.0
    with torch.no_grad():
        base = REFERENCE[arch](model, source, prompts, noise.clone(), g, 2)
        pipe = type(model.pipeline).from_pretrained(source, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(final / "lora")
        with_lora = REFERENCE[arch](model, pipe, prompts, noise.clone(), g, 2)
        merged = REFERENCE[arch](load_model(final), final, prompts, noise.clone(), g, 2)
    assert (with_lora - base).abs().max() > 1e-5  # the LoRA changes what plain diffusers generates ...
    assert torch.allclose(with_lora, merged, atol=1e-4), (with_lora - merged).abs().max()  # ... into final/'s


@pytest.mark.slow
@pytest.mark.parametrize("online", [True, False], ids=["online", "preference"])
def test_qwen_image_edit_trains_in_memory(tiny_pipeline, online, tmp_path, monkeypatch):
    """Qwen-Image-Edit's tiny pipeline lives in memory (its processor cannot be saved without
    torchvision): the trainer gets the adapter directly; the LoRA is reloaded into a fresh copy."""
    from tiny_pipelines import all_builders

    model = DiffusersDenoiser(tiny_pipeline("qwen_image_edit"), options=AdapterOptions(resolution=32))
    monkeypatch.setattr(trainer_module, "load_model", lambda name, device=None: model)
    monkeypatch.setattr(type(model), "save_pretrained", lambda self, d: None)  # nothing to write a pipeline from
    final = train_lora("in-memory", model, online, tmp_path)
    from diffalign.core.prompts import Prompt

    prompts = [Prompt("a red cube", [str(tmp_path / "s.png")])]
    fresh = all_builders()["qwen_image_edit"]()
    fresh.set_progress_bar_config(disable=True)
    noise = seeded_noise(model.sample_shape, [0])
    with torch.no_grad():
        base = REFERENCE["qwen_image_edit"](model, fresh, prompts, noise.clone(), 2.0, 2)
        fresh.load_lora_weights(final / "lora")
        with_lora = REFERENCE["qwen_image_edit"](model, fresh, prompts, noise.clone(), 2.0, 2)
        merged = REFERENCE["qwen_image_edit"](model, model.pipeline, prompts, noise.clone(), 2.0, 2)
    assert (with_lora - base).abs().max() > 1e-5
    assert torch.allclose(with_lora, merged, atol=1e-4), (with_lora - merged).abs().max()
