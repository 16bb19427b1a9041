"""The learned Bradley-Terry reward: shapes pairs, training, saving/loading, JSONL pairs, CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign import rewards
from diffalign.rewards.learned import (BTRewardModel, LearnedRewardConfig, Pairs, load_pairs_jsonl, make_shapes_pairs,
                                       pair_accuracy, train_bt_reward)
from diffalign.worlds import shapes as W


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("learned")
    train = make_shapes_pairs(1500, seed=0)
    res = train_bt_reward(train, out=out, steps=800, seed=0)
    return out, res


def test_shapes_pairs_are_ordered_by_the_verifier():
    p = make_shapes_pairs(40, seed=7)
    assert len(p) == 40 and p.chosen.shape == (40, 3, 32, 32) and set(p.kinds) <= {"drop", "extra", "recolor"}
    v = rewards.get("shapes")
    assert (v(p.chosen, p.prompts) > v(p.rejected, p.prompts)).all()
    flips = make_shapes_pairs(10, seed=1, corruptions=["flip"])
    assert all(W.parse(q).kind == "relation" for q in flips.prompts)
    with pytest.raises(ValueError, match="corruptions"):
        make_shapes_pairs(5, corruptions=["melt"])


def test_learned_reward_beats_chance_on_held_out_pairs(trained):
    out, res = trained
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert res["train_accuracy"] > 0.8
    r = rewards.get("learned", path=out)
    assert r.differentiable
    held = make_shapes_pairs(400, seed=123)  # other prompts and renders, same corruption kinds
    assert pair_accuracy(r, held) > 0.7
    # the documented imperfection: corruptions it never saw are (near) chance
    flips = make_shapes_pairs(200, seed=5, corruptions=["flip"])
    assert pair_accuracy(r, flips) < 0.7


def test_learned_reward_roundtrip_gradient_and_determinism(trained, tmp_path):
    out, res = trained
    r = rewards.get("learned", path=out)
    prompts = W.sample_prompts(4, seed=9)
    x = torch.from_numpy(W.render_batch(prompts, seed=9)[0]).permute(0, 3, 1, 2).float().div(255).requires_grad_(True)
    s = r(x, prompts)
    assert torch.allclose(s, res["model"](x, prompts).detach(), atol=1e-6)
    s.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.allclose(r(x[:, :, :, :].detach(), prompts), s.detach())
    big = torch.nn.functional.interpolate(x.detach(), size=64, mode="nearest")  # other sizes are resized
    assert torch.isfinite(r(big, prompts)).all()
    again = train_bt_reward(make_shapes_pairs(50, seed=0), out=None, steps=5, seed=3)
    again2 = train_bt_reward(make_shapes_pairs(50, seed=0), out=None, steps=5, seed=3)
    assert again["loss"] == again2["loss"]


def test_broken_model_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        rewards.get("learned", path=tmp_path)
    BTRewardModel(LearnedRewardConfig()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=str(tmp_path)):
        rewards.get("learned", path=tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        LearnedRewardConfig(model_type="other")
    with pytest.raises(ValueError, match="path=DIR"):
        rewards.get("learned")


def _write_pairs(tmp_path, n=24):
    p = make_shapes_pairs(n, seed=2)
    lines = []
    for i in range(n):
        for kind, img in (("c", p.chosen[i]), ("r", p.rejected[i])):
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).resize((48, 48), Image.NEAREST).save(tmp_path / f"{i}{kind}.png")
        lines.append(json.dumps({"prompt": p.prompts[i], "chosen": f"{i}c.png", "rejected": f"{i}r.png"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.jsonl", p


def test_jsonl_pairs(tmp_path):
    file, p = _write_pairs(tmp_path)
    q = load_pairs_jsonl(file)
    assert isinstance(q, Pairs) and q.prompts == p.prompts and q.chosen.shape == (24, 3, 32, 32)
    assert (q.chosen - p.chosen).abs().mean() < 0.05  # 32 -> 48 (nearest) -> 32 (bicubic)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "one red circle", "chosen": "missing.png", "rejected": "0r.png"}\n')
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_pairs_jsonl(bad)
    bad.write_text('{"prompt": "one red circle"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        load_pairs_jsonl(bad)


@pytest.mark.slow
def test_cli_train_reward(tmp_path):
    file, _ = _write_pairs(tmp_path)
    env_cmd = [sys.executable, "-m", "diffalign", "train-reward"]
    out = subprocess.run(env_cmd + ["--pairs-jsonl", str(file), "--steps", "20", "--out", str(tmp_path / "m1")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "train pair accuracy" in out.stdout and (tmp_path / "m1" / "model.safetensors").is_file()
    out = subprocess.run(env_cmd + ["--world", "shapes", "--pairs", "120", "--steps", "30", "--val-pairs", "40",
                                    "--out", str(tmp_path / "m2")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "held-out pair accuracy" in out.stdout and "unseen corruption 'flip'" in out.stdout
    out = subprocess.run(env_cmd + ["--world", "cubes", "--out", str(tmp_path / "m3")], capture_output=True, text=True)
    assert out.returncode != 0 and "only 'shapes'" in out.stderr
