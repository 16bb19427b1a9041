"""LoRA merged for rollouts (``runtime/lora.py: merged_lora``): samples of the merged model equal the
unmerged model's to float tolerance, the trained and base weights come back bit-identical, the
reference (adapter disabled) still works inside, and the trainer's runs with and without merging
agree."""

import pytest
import torch

from diffalign.core.sampling import sample, seeded_noise
from diffalign.runtime import trainer as trainer_module
from diffalign.runtime.lora import Reference, apply_lora, lora_layers, lora_targets, merged_lora
from diffalign.runtime.trainer import TrainConfig, train
from test_online_rl import tiny_model
from test_trainer import rows

PROMPTS = ["two red circles", "one blue square"]


def with_trained_lora(model):
    """LoRA with non-zero B (as after some training), so that merging changes the base weights."""
    model.requires_grad_(False)
    torch.manual_seed(1)
    model = apply_lora(model, 4, 8, lora_targets(model))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def draw(model, sampler="flow_sde"):
    base = model.get_base_model()
    noise = seeded_noise(base.sample_shape, [0, 1], "cpu")
    cond, uncond = base.encode_prompts(PROMPTS), base.encode_prompts([""] * 2)
    with torch.no_grad():
        return sample(model, cond, sampler=sampler, num_steps=3, guidance_scale=3.0, noise=noise, uncond=uncond,
                      generator=torch.Generator().manual_seed(0)).x0


def check_merge(model, sampler):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = seeded_noise(model.get_base_model().sample_shape, [5, 6], "cpu")
    t, cond = torch.tensor([0.7, 0.3]), model.get_base_model().encode_prompts(PROMPTS)
    with torch.no_grad():
        out_before = model(x, t, cond)
        ref_before = Reference(model)(lambda m: m(x, t, cond))
    unmerged = draw(model, sampler)
    with merged_lora(model):
        layers = lora_layers(model)
        assert sum(m.merged for m in layers) >= len(layers) // 2
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all("base_layer" in k for k in changed)  # the merge moved base weights only
        merged = draw(model, sampler)
        with torch.no_grad():  # the reference inside a merged rollout (peft unmerges to disable the adapter)
            torch.testing.assert_close(Reference(model)(lambda m: m(x, t, cond)), ref_before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)  # DDIM's x0 amplifies float rounding
    for k, v in model.state_dict().items():  # bit-identical: restored from a copy, not re-subtracted
        assert torch.equal(v, before[k]), k
    assert not any(m.merged for m in lora_layers(model))
    with torch.no_grad():
        assert torch.equal(model(x, t, cond), out_before)
    # and the adapter matters: without it the samples differ
    with model.disable_adapter():
        assert (draw(model, sampler) - unmerged).abs().max() > 1e-3


@pytest.mark.parametrize("kind,sampler", [("flow", "flow_sde"), ("epsilon", "ddim")])
def test_merged_rollouts_match_and_restore_the_weights_exactly(kind, sampler):
    check_merge(with_trained_lora(tiny_model(kind)), sampler)


def test_merged_rollouts_on_a_diffusers_pipeline(tmp_path):
    pytest.importorskip("diffusers")
    from diffalign.models import load_model
    from tiny_pipelines import build_sd

    model = load_model(build_sd(tmp_path / "sd"))
    check_merge(with_trained_lora(model), "ddim")


def test_merged_lora_is_a_no_op_without_lora():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with merged_lora(model) as m:
        assert m is model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_training_with_merged_rollouts_equals_training_without(tmp_path, monkeypatch):
    calls = []

    def counting(model):
        calls.append(len(lora_layers(model)))
        return merged_lora(model)

    monkeypatch.setattr(trainer_module, "merged_lora", counting)
    tiny_model("flow").save_pretrained(tmp_path / "base")
    runs = {}
    for merge in (True, False):
        cfg = TrainConfig(model=str(tmp_path / "base"), method="flow_grpo", reward="brightness", lora_rank=4, lr=1e-2,
                          merge_lora_rollouts=merge, epochs=3, checkpoint_every=10,
                          algorithm={"group_size": 4, "batch_size": 8, "num_steps": 3, "micro_batch_size": 12,
                                     "beta": 0.04})
        train(cfg, tmp_path / str(merge), progress=False)
        runs[merge] = rows(tmp_path / str(merge))
    assert len(calls) == 3 and all(n > 0 for n in calls)  # every epoch's rollout ran merged
    for a, b in zip(runs[True], runs[False]):
        for k, v in a.items():
            if isinstance(v, float):
                assert v == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["epoch"], k)
