"""Every shipped prompt set loads with its expected count; the training sets are named in configs
that validate; the README names each set's source and licence."""

from pathlib import Path

import pytest
import yaml

from diffalign.config import load_config
from diffalign.data import prompt_sets
from diffalign.runtime.prompts import PromptSource, PromptsConfig
from diffalign.runtime.trainer import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPECTED = {"ddpo/simple_animals": 45, "geneval/benchmark": 553, "geneval/test": 553, "ocr/test": 1018,
            "pickscore/train": 25432, "pickscore/test": 2048}
EVAL_ONLY = {"geneval/benchmark", "geneval/test", "ocr/test", "pickscore/test"}  # named by `diffalign eval`


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_set_loads_with_its_count(name):
    prompts = prompt_sets.load(name)
    assert len(prompts) == EXPECTED[name] and all(p.strip() == p and p for p in prompts)
    if name.startswith("geneval/"):
        meta = prompt_sets.metadata(name)
        assert [m["prompt"] for m in meta] == prompts
    if name.startswith("ocr/"):
        from diffalign.rewards.ocr import quoted_text

        assert all(quoted_text(p) for p in prompts)  # every OCR prompt quotes its text
    assert f"`{name}`" in (prompt_sets.ROOT / "README.md").read_text()


def test_set_names_and_errors():
    assert prompt_sets.names() == sorted(EXPECTED)
    assert len(prompt_sets.geneval_object_names()) == 80
    with pytest.raises(ValueError, match="unknown prompt set 'nope'.*pickscore/train"):
        prompt_sets.load("nope")
    with pytest.raises(ValueError, match="no metadata"):
        prompt_sets.metadata("pickscore/test")
    with pytest.raises(ValueError, match=r"prompts\.set must be one of"):
        PromptsConfig(set="geneval/train")
    with pytest.raises(ValueError, match="both given"):
        PromptsConfig(set="ocr/test", file="x.txt")
    src = PromptSource(PromptsConfig(set="ddpo/simple_animals"))
    assert set(src.sample(8, seed=0)) <= set(prompt_sets.load("ddpo/simple_animals"))
    assert src.sample(8, seed=0) == src.sample(8, seed=0)


def test_training_sets_are_named_in_configs_that_validate():
    named = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if isinstance(raw, dict) and isinstance(raw.get("prompts"), dict) and raw["prompts"].get("set"):
            cfg = load_config(TrainConfig, path)  # validates, the prompt set included
            named.setdefault(cfg.prompts.set, []).append(path.name)
    assert set(named) == set(EXPECTED) - EVAL_ONLY, named
    assert {"ddpo_sd15.yaml", "draft_sd15.yaml"} <= set(named["ddpo/simple_animals"])
    assert {"flow_grpo_sd35.yaml", "flow_grpo_flux.yaml"} <= set(named["pickscore/train"])
