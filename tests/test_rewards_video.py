"""Rewards on videos: any image reward by frame (mean, min, one frame), temporal consistency,
motion magnitude, and consistency with the conditioning image of an edit."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign import rewards
from diffalign.core.prompts import Prompt
from diffalign.rewards.testing import save_tiny_clip

pytest.importorskip("transformers")


def flat_video(levels, size=8):
    """``[1, F, 3, H, W]``: frame ``f`` is the constant grey ``levels[f]``."""
    return torch.tensor(levels).view(1, -1, 1, 1, 1).expand(1, len(levels), 3, size, size).clone()


def fading_video(frames=8, size=32):
    """``[1, F, 3, H, W]``: a textured image fading from dark red to bright blue, a small step per frame."""
    texture = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) * 0.2
    a = torch.linspace(0, 1, frames).view(frames, 1, 1, 1)
    red, blue = torch.tensor([0.6, 0.0, 0.0]).view(3, 1, 1), torch.tensor([0.1, 0.2, 0.8]).view(3, 1, 1)
    return ((1 - a) * red + a * blue + texture).clamp(0, 1)[None]


def test_an_image_reward_scores_a_video_by_frame():
    video = flat_video([0.2, 0.8, 0.5])
    mean = rewards.get("brightness")
    meta = [{}]
    assert mean(video, ["x"], meta).item() == pytest.approx(0.5, abs=1e-4)
    assert meta[0]["frame_scores"] == pytest.approx([0.2, 0.8, 0.5], abs=1e-4)
    assert rewards.get("brightness", frames="min")(video, ["x"]).item() == pytest.approx(0.2, abs=1e-4)
    assert rewards.get("brightness", frames=1)(video, ["x"]).item() == pytest.approx(0.8, abs=1e-4)
    assert rewards.get("brightness", frames=-1)(video, ["x"]).item() == pytest.approx(0.5, abs=1e-4)
    # the gradient reaches every frame of a differentiable reward
    v = video.clone().requires_grad_(True)
    mean(v, ["x"]).sum().backward()
    assert v.grad.abs().flatten(2).sum(2).min() > 0
    with pytest.raises(ValueError, match="frames=3 is outside the videos' 3 frames"):
        rewards.get("brightness", frames=3)(video, ["x"])
    with pytest.raises(ValueError, match=r"frames must be one of \['mean', 'min'\] or a frame index"):
        rewards.get("brightness", frames="max")
    with pytest.raises(ValueError, match="scores whole videos"):
        rewards.get("motion_magnitude", frames=0)
    with pytest.raises(ValueError, match=r"got 1 images but 2 prompts"):
        mean(video, ["x", "y"])


def test_motion_magnitude_is_zero_for_a_still_video_and_the_mean_frame_difference_otherwise():
    motion = rewards.get("motion_magnitude")
    assert motion(flat_video([0.3, 0.3, 0.3]), ["x"]).item() == 0
    assert motion(flat_video([0.0, 1.0, 0.0, 1.0]), ["x"]).item() == pytest.approx(1.0)
    assert motion(flat_video([0.2, 0.4, 0.5]), ["x"]).item() == pytest.approx(0.15)
    assert motion(flat_video([0.2]), ["x"]).item() == 0  # one frame: nothing moves
    with pytest.raises(ValueError, match=r"must have 5 dims \[B, F, 3, H, W\]"):
        motion(torch.zeros(1, 3, 8, 8), ["x"])


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_temporal_consistency_is_one_for_a_still_video_and_lower_for_shuffled_frames(clip_dir):
    tc = rewards.get("temporal_consistency", path=clip_dir)
    video = fading_video()
    still = video[:, :1].expand_as(video)
    shuffled = video[:, [0, 7, 1, 6, 2, 5, 3, 4]]  # the same frames, jumping back and forth
    s_still, s_video, s_shuffled = (tc(v, ["x"]).item() for v in (still, video, shuffled))
    assert s_still == pytest.approx(1.0, abs=1e-5)
    assert s_shuffled < s_video < 1.0
    assert tc(torch.cat([still, shuffled]), ["x", "y"]).shape == (2,)


def test_combined_rewards_pass_videos_to_their_parts(clip_dir):
    combo = rewards.WeightedSum([rewards.get("brightness", frames="min"), rewards.get("motion_magnitude")], [1.0, 2.0])
    video = flat_video([0.2, 0.8, 0.5])
    assert combo(video, ["x"]).item() == pytest.approx(0.2 + 2 * 0.45, abs=1e-4)
    assert combo.part_names == ["brightness", "motion_magnitude"]


def test_source_consistency_rewards_compare_with_the_conditioning_image(clip_dir, tmp_path):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(src).save(tmp_path / "src.png")
    prompt = Prompt("make it red", [tmp_path / "src.png"])
    same = torch.from_numpy(src).permute(2, 0, 1)[None].float() / 255
    other = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    l2, clip = rewards.get("source_l2"), rewards.get("source_clip", path=clip_dir)
    assert l2(same, [prompt]).item() == pytest.approx(0.0, abs=1e-6)
    assert l2(other, [prompt]).item() < -1e-3
    assert clip(same, [prompt]).item() == pytest.approx(1.0, abs=1e-5)
    assert clip(other, [prompt]).item() < clip(same, [prompt]).item()
    # image-to-video: the first frame against the image it was conditioned on
    video = torch.stack([same[0], other[0]])[None]
    assert rewards.get("source_l2", frames=0)(video, [prompt]).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="compares with the prompt's conditioning image; 'plain' has none"):
        l2(same, ["plain"])
