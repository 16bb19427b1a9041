from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from diffalign.config import (
    ConfigTypeError,
    check_choice,
    check_positive,
    check_range,
    diff_configs,
    dump_config,
    from_dict,
    load_config,
    merge,
    parse_overrides,
    save_config,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = 100

    def __post_init__(self):
        check_positive("lr", self.lr)
        check_range("steps", self.steps, 1, 10_000, integer=True)


@dataclass
class Algo:
    name: Literal["grpo", "dpo"] = "grpo"
    clip_range: float = 0.2
    eta: float = 1.0

    def __post_init__(self):
        check_range("clip_range", self.clip_range, 0.0, 1.0, lo_open=True)


@dataclass
class Run:
    name: str
    train: Optim = field(default_factory=Optim)
    algorithm: Optional[Algo] = None
    sampler: str = "euler"
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    seed: int | None = None

    def __post_init__(self):
        check_choice("sampler", self.sampler, ["euler", "heun"])


def _full() -> Run:
    return Run(name="exp", train=Optim(lr=3e-5, betas=(0.8, 0.99), steps=7),
               algorithm=Algo(name="dpo", clip_range=2e-4), sampler="heun",
               tags=["a", "b"], weights={"clip": 0.5, "aes": 2.0}, seed=3)


# ------------------------------------------------------------------ validation helpers
def test_check_range_messages():
    assert check_range("x", 0.5, 0, 1) == 0.5
    with pytest.raises(ValueError, match=r"^clip_range must be in \(0, 1\], got 1\.5$"):
        check_range("clip_range", 1.5, 0, 1, lo_open=True)
    with pytest.raises(ValueError, match=r"^x must be in \[0, inf\), got -1$"):
        check_range("x", -1, 0)
    with pytest.raises(ValueError, match=r"^x must be in \(-inf, 1\), got 1$"):
        check_range("x", 1, hi=1, hi_open=True)
    with pytest.raises(ValueError, match=r"got nan"):
        check_range("x", float("nan"))
    with pytest.raises(ValueError, match=r"^steps must be an integer in \[1, inf\), got 2\.0$"):
        check_range("steps", 2.0, 1, integer=True)
    with pytest.raises(ValueError, match="got True"):
        check_range("steps", True, 0, integer=True)
    with pytest.raises(ValueError, match=r"^lr must be in \(0, inf\), got 0$"):
        check_positive("lr", 0)


def test_check_choice_message():
    assert check_choice("sampler", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError) as e:
        check_choice("sampler", "c", ("a", "b"))
    assert str(e.value) == "sampler must be one of ['a', 'b'], got 'c'"


# ------------------------------------------------------------------ from_dict / to_dict
def test_from_dict_nested_and_coercion():
    cfg = from_dict(Run, {"name": "r", "train": {"lr": "1e-4", "betas": [0.5, 1], "steps": 5},
                          "algorithm": {"clip_range": 1}, "weights": {"clip": 1}})
    assert cfg.train == Optim(lr=1e-4, betas=(0.5, 1.0), steps=5)
    assert isinstance(cfg.train.betas, tuple) and isinstance(cfg.train.betas[1], float)
    assert cfg.algorithm == Algo(clip_range=1.0) and isinstance(cfg.algorithm.clip_range, float)
    assert cfg.weights == {"clip": 1.0} and isinstance(cfg.weights["clip"], float)
    assert cfg.sampler == "euler" and cfg.tags == [] and cfg.seed is None


def test_to_dict_is_plain():
    d = to_dict(_full())
    assert d["train"]["betas"] == [0.8, 0.99] and isinstance(d["train"]["betas"], list)
    assert d["algorithm"] == {"name": "dpo", "clip_range": 2e-4, "eta": 1.0}
    assert list(d) == ["name", "train", "algorithm", "sampler", "tags", "weights", "seed"]
    assert from_dict(Run, d) == _full()


def test_unknown_key_names_dotted_path_and_suggests():
    with pytest.raises(ValueError) as e:
        from_dict(Run, {"name": "r", "train": {"lrr": 1e-3}})
    msg = str(e.value)
    assert "'train.lrr'" in msg and "did you mean 'train.lr'" in msg
    assert "['lr', 'betas', 'steps']" in msg
    with pytest.raises(ValueError, match="'algorithm.clip_rnage'.*did you mean 'algorithm.clip_range'"):
        from_dict(Run, {"name": "r", "algorithm": {"clip_rnage": 0.1}})


@pytest.mark.parametrize("data, where, shown", [
    ({"train": {"lr": "fast"}}, "train.lr", "'fast'"),
    ({"train": {"steps": 2.5}}, "train.steps", "2.5"),
    ({"train": {"steps": True}}, "train.steps", "True"),
    ({"train": {"betas": [0.9]}}, "train.betas", "[0.9]"),
    ({"train": {"betas": [0.9, "x"]}}, r"train.betas[1]", "'x'"),
    ({"algorithm": {"name": "ppo"}}, "algorithm.name", "'ppo'"),
    ({"algorithm": 3}, "algorithm", "3"),
    ({"tags": "a"}, "tags", "'a'"),
    ({"sampler": 1}, "sampler", "1"),
    ({"seed": "x"}, "seed", "'x'"),
    ({"weights": {"clip": [1]}}, "weights.clip", "[1]"),
])
def test_wrong_type_names_field_and_value(data, where, shown):
    with pytest.raises(ConfigTypeError) as e:
        from_dict(Run, {"name": "r", **data})
    msg = str(e.value)
    assert msg.startswith(where + ":") and shown in msg
    assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError)


def test_missing_required_field():
    with pytest.raises(ValueError, match="missing required config field 'name'"):
        from_dict(Run, {"sampler": "euler"})


def test_post_init_validation_carries_field_value_range():
    with pytest.raises(ValueError) as e:
        from_dict(Run, {"name": "r", "algorithm": {"clip_range": 1.5}})
    assert str(e.value) == "algorithm: clip_range must be in (0.0, 1.0], got 1.5"
    with pytest.raises(ValueError, match=r"^train: steps must be an integer in \[1, 10000\], got 0$"):
        from_dict(Run, {"name": "r", "train": {"steps": 0}})
    with pytest.raises(ValueError, match=r"^sampler must be one of \['euler', 'heun'\], got 'ddim'$"):
        from_dict(Run, {"name": "r", "sampler": "ddim"})


# ------------------------------------------------------------------ overrides
def test_parse_overrides_nested_lists_and_exponent_floats():
    out = parse_overrides(["train.lr=1e-4", "train.betas=[0.5, 0.6]", "name=foo",
                           "algorithm.clip_range=2e-4", "train.steps=3", "x.y.z=true", "s=1.0e5",
                           "seed=null", "q='1e-4'"])
    assert out == {"train": {"lr": 1e-4, "betas": [0.5, 0.6], "steps": 3},
                   "name": "foo", "algorithm": {"clip_range": 2e-4}, "x": {"y": {"z": True}},
                   "s": 1e5, "seed": None, "q": "1e-4"}
    assert isinstance(out["train"]["lr"], float) and isinstance(out["s"], float)
    assert parse_overrides(["a=1", "a=2"]) == {"a": 2}
    assert parse_overrides(["k=a=b"]) == {"k": "a=b"}


@pytest.mark.parametrize("item", ["train.lr", "", "=3", "a..b=1", "a.=1"])
def test_parse_overrides_rejects_bad_items(item):
    with pytest.raises(ValueError, match="bad override"):
        parse_overrides([item])


def test_merge_is_deep_and_copies():
    base = {"a": {"b": 1, "c": [1]}, "d": 2}
    out = merge(base, {"a": {"b": 5}, "e": 3})
    assert out == {"a": {"b": 5, "c": [1]}, "d": 2, "e": 3}
    out["a"]["c"].append(2)
    assert base == {"a": {"b": 1, "c": [1]}, "d": 2}


# ------------------------------------------------------------------ files
def test_yaml_round_trip(tmp_path):
    cfg = _full()
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file() and os.listdir(path.parent) == ["config.yaml"]  # no temp left
    assert load_config(Run, path) == cfg
    assert yaml.safe_load(dump_config(cfg))["train"]["lr"] == 3e-5
    assert dump_config(cfg).startswith("name: exp\n")


def test_load_config_precedence_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: file\ntrain:\n  lr: 1e-3\n  steps: 10\nalgorithm:\n  eta: 0.5\n")
    cfg = load_config(Run, p, ["train.lr=3e-5", "algorithm.clip_range=2e-4",
                               "train.betas=[0.1,0.2]", "tags=[x]"],
                      base={"name": "base", "sampler": "heun", "train": {"steps": 2}})
    assert cfg == Run(name="file", sampler="heun", tags=["x"],
                      train=Optim(lr=3e-5, betas=(0.1, 0.2), steps=10),
                      algorithm=Algo(eta=0.5, clip_range=2e-4))
    assert load_config(Run, p).train.lr == 1e-3  # YAML-1.1 "1e-3" string read as float
    assert load_config(Run, overrides=["name=n"]) == Run(name="n")
    assert load_config(Run, overrides={"name": "d"}) == Run(name="d")


def test_load_config_errors_name_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Run, missing)
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"list\.yaml: .*mapping"):
        load_config(Run, p)
    p = tmp_path / "bad.yaml"
    p.write_text("name: r\nalgorithm:\n  clip_range: 3\n")
    with pytest.raises(ValueError) as e:
        load_config(Run, p)
    assert str(e.value) == f"{p}: algorithm: clip_range must be in (0.0, 1.0], got 3.0"
    with pytest.raises(ConfigTypeError, match=r"bad\.yaml: train\.lr: expected float, got 'x'"):
        load_config(Run, p, ["train.lr=x", "algorithm.clip_range=0.1"])
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown config key 'train\.lrr'"):
        load_config(Run, p, ["train.lrr=1"])


# ------------------------------------------------------------------ diff
def test_diff_configs_lists_exactly_differing_keys():
    a = to_dict(_full())
    b = to_dict(dataclasses.replace(_full(), train=Optim(lr=1e-3, betas=(0.8, 0.99), steps=7),
                                    sampler="euler", algorithm=None))
    assert diff_configs(a, b) == ["train.lr", "algorithm", "sampler"]
    assert diff_configs(_full(), _full()) == []
    assert diff_configs({"a": {"b": (1, 2)}, "n": float("nan")}, {"a": {"b": [1, 2]}, "n": float("nan")}) == []
    assert diff_configs({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}, "d": 0}) == ["a.c", "d"]


@dataclass
class Paths:
    out: Path = Path("runs")
    mode: Optional[Literal["a", "b"]] = None
    key: int | str = 0


def test_paths_and_unions_round_trip(tmp_path):
    cfg = from_dict(Paths, {"out": "x/y", "mode": "b", "key": "k"})
    assert cfg == Paths(out=Path("x/y"), mode="b", key="k")
    assert to_dict(cfg) == {"out": "x/y", "mode": "b", "key": "k"}
    assert load_config(Paths, save_config(cfg, tmp_path / "p.yaml")) == cfg
    assert from_dict(Paths, {"key": 3}).key == 3
    with pytest.raises(ConfigTypeError, match=r"^key: expected int \| str, got 1\.5"):
        from_dict(Paths, {"key": 1.5})
    with pytest.raises(ConfigTypeError, match=r"^mode: must be one of \['a', 'b'\], got 'c'"):
        from_dict(Paths, {"mode": "c"})
