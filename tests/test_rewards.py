"""The reward contract, the registry, WeightedSum, the shapes rewards and the image statistics."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign import rewards
from diffalign.rewards import WeightedSum, check_inputs
from diffalign.rewards.corrupt import CORRUPTIONS, corrupt, corrupted_batch
from diffalign.worlds import shapes as W

CHEAP = ["shapes", "shapes_correct", "shapes_soft", "brightness", "saturation", "colorfulness",
         "jpeg_compressibility", "jpeg_incompressibility"]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def renders():
    prompts = W.sample_prompts(48, seed=3)
    images, layouts = W.render_batch(prompts, seed=1)
    return prompts, to_tensor(images), layouts


# ------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("name", CHEAP)
def test_contract_shape_dtype_attributes(name, renders):
    prompts, x, _ = renders
    r = rewards.get(name)
    assert r.name == name and isinstance(r.differentiable, bool)
    out = r(x[:5], prompts[:5])
    assert out.shape == (5,) and out.dtype == torch.float32 and out.device == x.device
    assert torch.isfinite(out).all()
    assert r(x[:0], []).shape == (0,)


@pytest.mark.parametrize("name", CHEAP)
def test_shared_validation(name, renders):
    prompts, x, _ = renders
    r = rewards.get(name)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        r(x[:2] * 2 - 1, prompts[:2])
    with pytest.raises(ValueError, match="4 dims"):
        r(x[0], prompts[:1])
    with pytest.raises(ValueError, match="3 channels"):
        r(x[:2, :1], prompts[:2])
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        r(x[:2], prompts[:3])
    with pytest.raises(ValueError, match="list of strings"):
        r(x[:1], prompts[0])
    with pytest.raises(ValueError, match="meta"):
        r(x[:2], prompts[:2], meta=[{}])
    r((x[:2] + 5e-5), prompts[:2])  # within the 1e-4 slack
    with pytest.raises(ValueError, match="range"):
        r(x[:2] + 1e-3, prompts[:2])


def test_check_inputs_rejects_nan_and_int():
    x = torch.rand(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_inputs(x, ["a", "b"])
    with pytest.raises(ValueError, match="float"):
        check_inputs(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"])
    with pytest.raises(ValueError, match="torch.Tensor"):
        check_inputs(np.zeros((2, 3, 8, 8)), ["a", "b"])


# ------------------------------------------------------------------------------------ registry
def test_registry_names_and_errors():
    names = rewards.names()
    for n in CHEAP + ["clipscore", "pickscore", "aesthetic", "hpsv2", "imagereward", "learned", "remote"]:
        assert n in names
    assert names == sorted(names)
    with pytest.raises(ValueError, match="known rewards: .*shapes"):
        rewards.get("nope")
    with pytest.raises(ValueError, match="accepts"):
        rewards.get("brightness", path="/x")
    with pytest.raises(ValueError, match="path=DIR"):
        rewards.get("clipscore")


def test_get_many_and_register():
    parts = rewards.get_many("shapes, brightness")
    assert [p.name for p in parts] == ["shapes", "brightness"]
    assert [p.name for p in rewards.get_many(["saturation"])] == ["saturation"]
    parts = rewards.get_many("shapes_soft,jpeg_compressibility", jpeg_compressibility={"quality": 50})
    assert parts[1].quality == 50
    with pytest.raises(ValueError, match="unknown reward"):
        rewards.get_many("shapes,bogus")
    with pytest.raises(ValueError, match="non-empty"):
        rewards.get_many("shapes,,brightness")
    with pytest.raises(ValueError, match="not in the spec"):
        rewards.get_many("shapes", clipscore={"path": "x"})

    class Const(rewards.Reward):
        name = "const_test"

        def score(self, images, prompts, meta):
            return torch.full((images.shape[0],), 2.0)

    rewards.register("const_test", Const, "constant")
    assert "const_test" in rewards.names()
    assert rewards.get("const_test")(torch.zeros(2, 3, 4, 4), ["a", "b"]).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("const_test", Const)


def test_missing_optional_dependency_names_the_extra():
    from diffalign.rewards.base import require

    with pytest.raises(ImportError, match=r"pip install diffalign\[rewards\]"):
        require("no_such_module_for_diffalign", "the test reward")


def test_import_is_light():
    code = ("import sys, diffalign.rewards as r; r.names(); "
            "heavy = [m for m in ('transformers', 'fastapi', 'httpx', 'uvicorn') if m in sys.modules]; "
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# -------------------------------------------------------------------------------------- shapes
def test_shapes_reward_details_and_meta(renders):
    prompts, x, layouts = renders
    r = rewards.get("shapes")
    det = r.details(x, prompts)
    assert set(det) == {"score", "correct", "count", "color", "shape", "relation"}
    assert det["correct"].all() and np.allclose(det["score"], 1)
    kinds = [W.parse(p).kind for p in prompts]
    assert all(np.isnan(det["relation"][i]) == (k == "count") for i, k in enumerate(kinds))
    bad, _, idx = corrupted_batch(prompts, layouts, ["recolor"], seed=0)
    meta = [{} for _ in idx]
    s = r(to_tensor(bad), [prompts[i] for i in idx], meta)
    ref = W.verify(bad, [prompts[i] for i in idx])
    assert np.allclose(s.numpy(), ref.score) and (s < 1).all()
    assert meta[0]["shapes"]["score"] == pytest.approx(float(ref.score[0]))
    assert set(meta[0]["shapes"]) >= {"score", "correct", "count", "color", "shape", "relation", "objects"}
    c = rewards.get("shapes_correct")(to_tensor(bad), [prompts[i] for i in idx])
    assert set(c.tolist()) <= {0.0, 1.0} and c.sum() == 0


def test_corruptions_lower_the_verifier_score(renders):
    prompts, _, layouts = renders
    rng = np.random.default_rng(0)
    for kind in CORRUPTIONS:
        done = 0
        for p, lay in zip(prompts, layouts):
            new = corrupt(lay, p, kind, rng)
            if new is None:
                assert kind in ("flip", "extra")
                continue
            done += 1
            assert W.verify(W.draw(new), [p]).score[0] < 1, (kind, p)
        assert done >= 10, kind
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(layouts[0], prompts[0], "melt", rng)


def test_shapes_soft_tracks_the_verifier(renders):
    prompts, x, layouts = renders
    soft = rewards.get("shapes_soft")
    assert soft.differentiable
    good = soft(x, prompts)
    for kind in ("drop", "extra", "recolor", "flip"):
        bad, _, idx = corrupted_batch(prompts, layouts, [kind], seed=1)
        worse = soft(to_tensor(bad), [prompts[i] for i in idx])
        assert good[idx].mean() > worse.mean() + 0.03, kind
        assert (good[idx] > worse).float().mean() > 0.6, kind
    blank = soft(torch.ones_like(x), prompts)
    assert good.mean() > blank.mean() + 0.15


def test_shapes_soft_gradient_is_finite_and_useful(renders):
    prompts, x, _ = renders
    soft = rewards.get("shapes_soft")
    noisy = (x[:8] * 0.8 + 0.1 + 0.05 * torch.randn_like(x[:8])).clamp(0, 1).requires_grad_(True)
    score = soft(noisy, prompts[:8])
    score.sum().backward()
    g = noisy.grad
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert (g.flatten(1).abs().sum(1) > 0).all()  # every image gets a gradient
    with torch.no_grad():  # a small step along the gradient raises the score
        stepped = (noisy + 0.02 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
        assert (soft(stepped, prompts[:8]) >= score.detach() - 1e-6).all()
    meta = [{} for _ in range(2)]
    soft(x[:2], prompts[:2], meta)
    assert set(meta[0]["shapes_soft"]) == {"match", "clean", "relation", "score"}


def test_shapes_soft_can_be_hacked():
    """What it misses (documented): the shape. A square where a circle is asked scores as high."""
    soft, ver = rewards.get("shapes_soft"), rewards.get("shapes")
    circle = W.draw([{"color": "red", "shape": "circle", "bbox": (10, 10, 22, 22)}])
    square = W.draw([{"color": "red", "shape": "square", "bbox": (11, 11, 21, 21)}])  # similar area
    x = to_tensor(np.stack([circle, square]))
    s = soft(x, ["one red circle"] * 2)
    v = ver(x, ["one red circle"] * 2)
    assert v[0] == 1 and v[1] < 1
    assert float(s[1]) > float(s[0]) - 0.02


# ---------------------------------------------------------------------------------- statistics
def test_brightness_saturation_colorfulness_values():
    x = torch.zeros(3, 3, 4, 4)
    x[0] = 1.0  # white
    x[1, 0] = 1.0  # pure red
    x[2] = 0.5  # grey
    b = rewards.get("brightness")(x, ["", "", ""])
    assert torch.allclose(b, torch.tensor([1.0, 0.299, 0.5]), atol=1e-6)
    s = rewards.get("saturation")(x, ["", "", ""])
    assert s[0] == pytest.approx(0) and s[1] == pytest.approx(1, abs=1e-2) and s[2] == pytest.approx(0)
    c = rewards.get("colorfulness")(x, ["", "", ""])
    # uniform red: rg = 255, yb = 127.5, no spread -> 0.3 * |mu|
    assert c[1] == pytest.approx(0.3 * (255**2 + 127.5**2) ** 0.5, rel=1e-4)
    assert c[0] == pytest.approx(0, abs=1e-3) and c[2] == pytest.approx(0, abs=1e-3)


@pytest.mark.parametrize("name", ["brightness", "saturation", "colorfulness"])
def test_statistics_are_differentiable(name):
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_(True)
    r = rewards.get(name)
    assert r.differentiable
    r(x, ["", ""]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_jpeg_rewards_match_pil_and_order_images():
    rng = np.random.default_rng(0)
    flat = np.full((32, 32, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = to_tensor(np.stack([flat, noise]))
    comp, incomp = rewards.get("jpeg_compressibility"), rewards.get("jpeg_incompressibility")
    assert not comp.differentiable
    c, i = comp(x, ["", ""]), incomp(x, ["", ""])
    assert torch.allclose(c, -i)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    assert i[1] == pytest.approx(buf.tell() / 1000)
    assert c[0] > c[1]  # the flat image compresses better
    with pytest.raises(ValueError, match="quality"):
        rewards.get("jpeg_compressibility", quality=0)


# -------------------------------------------------------------------------------- WeightedSum
def test_weighted_sum_none_fixed_running(renders):
    prompts, x, _ = renders
    b, s = rewards.get("brightness"), rewards.get("shapes")
    xs, ps = x[:6], prompts[:6]
    ws = WeightedSum([b, s], [2.0, -1.0])
    assert torch.allclose(ws(xs, ps), 2 * b(xs, ps) - s(xs, ps))
    assert not ws.differentiable and ws.part_names == ["brightness", "shapes"]
    meta = [{} for _ in ps]
    ws(xs, ps, meta)
    assert set(meta[0]["rewards"]) == {"brightness", "shapes"} and "shapes" in meta[0]
    fixed = WeightedSum([b, b], [1.0, 1.0], normalize="fixed", scales=[0.5, 2.0], offsets=[0.1, 0.0])
    assert torch.allclose(fixed(xs, ps), (b(xs, ps) - 0.1) / 0.5 + b(xs, ps) / 2.0)
    assert fixed.part_names == ["brightness", "brightness#2"]
    run = WeightedSum("brightness,saturation", normalize="running")
    assert run.differentiable
    out = run(xs, ps)
    assert abs(float(out.mean())) < 1e-4  # each part standardised with its own stats (incl. this batch)
    allb = torch.cat([b(xs, ps), b(x[6:12], prompts[6:12])])
    run(x[6:12], prompts[6:12])
    assert run.mean[0] == pytest.approx(float(allb.mean()), abs=1e-6)
    assert run.std(0) == pytest.approx(float(allb.std(unbiased=False)), rel=1e-5)
    state = run.state_dict()
    other = WeightedSum("brightness,saturation", normalize="running")
    other.load_state_dict(state)
    assert other.count == [12, 12]


def test_weighted_sum_gradient_and_errors(renders):
    prompts, x, _ = renders
    ws = WeightedSum(["shapes_soft", "brightness"], [1.0, 0.5], normalize="running")
    xx = x[:4].clone().requires_grad_(True)
    ws(xx, prompts[:4]).sum().backward()
    assert torch.isfinite(xx.grad).all() and xx.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="weights"):
        WeightedSum(["brightness"], [1.0, 2.0])
    with pytest.raises(ValueError, match="scales"):
        WeightedSum(["brightness"], normalize="fixed")
    with pytest.raises(ValueError, match="normalize"):
        WeightedSum(["brightness"], normalize="zscore")
    with pytest.raises(ValueError, match="only used"):
        WeightedSum(["brightness"], scales=[1.0])
    with pytest.raises(ValueError, match="running statistics"):
        ws.load_state_dict({"names": ["x"], "count": [1], "mean": [0.0], "m2": [0.0]})
