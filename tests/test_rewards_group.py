"""Group-wise rewards (rank and win rate within the group of one prompt) and the online methods
feeding them whole groups."""

import pytest
import torch

from diffalign import algorithms, rewards
from diffalign.algorithms._rollout import safe_reward
from diffalign.rewards.base import Reward
from diffalign.rewards.group import GroupRank, GroupWinRate, rank_in_group


class Fixed(Reward):
    """A pointwise reward: the image's mean value times 10 (known scores, ties when images tie)."""

    name = "fixed"

    def score(self, images, prompts, meta):
        return images.mean((1, 2, 3)) * 10


def batch(seed=0, groups=3, size=4):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(groups * size, 3, 4, 4, generator=g)
    prompts = [f"prompt {i}" for i in range(groups) for _ in range(size)]
    return images, prompts, torch.arange(groups).repeat_interleave(size)


def test_rank_in_group_values_and_ties():
    assert rank_in_group(torch.tensor([3.0, 1.0, 2.0])).tolist() == [1.0, 0.0, 0.5]
    assert rank_in_group(torch.tensor([1.0, 1.0, 5.0])).tolist() == [0.25, 0.25, 1.0]
    assert rank_in_group(torch.tensor([7.0])).tolist() == [0.5]


@pytest.mark.parametrize("make", [
    lambda: GroupRank(Fixed()),
    lambda: GroupWinRate(Fixed()),
    lambda: GroupWinRate(Fixed(), preference="hard"),
    lambda: GroupWinRate(pairwise=lambda a, b, p: torch.sigmoid(10 * (a.mean((1, 2, 3)) - b.mean((1, 2, 3))))),
])
def test_group_scores_are_a_permutation_invariant_function_of_the_group(make):
    reward = make()
    images, prompts, group = batch()
    out = reward(images, prompts, group=group)
    for seed in range(3):
        perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
        shuffled = reward(images[perm], [prompts[i] for i in perm], group=group[perm])
        assert torch.allclose(shuffled, out[perm], atol=1e-6)
    # a group's scores depend on that group only
    alone = reward(images[4:8], prompts[4:8])
    assert torch.allclose(alone, out[4:8], atol=1e-6)
    # without ids, groups are the images of one prompt
    assert torch.allclose(reward(images, prompts), out, atol=1e-6)
    assert reward.groupwise and not reward.differentiable


def test_win_rate_definitions():
    images, prompts, group = batch(groups=1, size=3)
    base = Fixed()(images, prompts)
    bt = GroupWinRate(Fixed())(images, prompts)
    d = base[:, None] - base[None, :]
    want = (torch.sigmoid(d).sum(1) - 0.5) / 2  # diagonal sigmoid(0) = 0.5 excluded
    assert torch.allclose(bt, want, atol=1e-6)
    assert torch.allclose(GroupWinRate(Fixed(), preference="hard")(images, prompts), GroupRank(Fixed())(images, prompts))
    # a pairwise model that is Bradley-Terry on the base scores gives the Bradley-Terry win rate
    pair = GroupWinRate(pairwise=lambda a, b, p: torch.sigmoid(Fixed()(a, p) - Fixed()(b, p)))
    assert torch.allclose(pair(images, prompts), bt, atol=1e-6)
    assert GroupWinRate(Fixed(), temperature=1e-6)(images, prompts).tolist() == pytest.approx(
        GroupRank(Fixed())(images, prompts).tolist(), abs=1e-4)  # the hard limit


def test_learned_bradley_terry_reward_as_win_rate(tmp_path):
    from diffalign.rewards.learned import make_shapes_pairs, train_bt_reward

    train_bt_reward(make_shapes_pairs(64, seed=0), out=tmp_path / "rm", steps=5)
    r = rewards.get("group_winrate", base="learned", base_kwargs={"path": str(tmp_path / "rm")})
    images = torch.rand(4, 3, 32, 32)
    prompts = ["two red circles"] * 4
    learned = rewards.get("learned", path=str(tmp_path / "rm"))(images, prompts)
    want = (torch.sigmoid(learned[:, None] - learned[None, :]).sum(1) - 0.5) / 3
    assert torch.allclose(r(images, prompts), want, atol=1e-5)


def test_bad_groups_and_arguments():
    images, prompts, group = batch()
    with pytest.raises(ValueError, match="mixes prompts"):
        GroupRank(Fixed())(images, prompts, group=torch.zeros(12))
    with pytest.raises(ValueError, match="one id per image"):
        GroupRank(Fixed())(images, prompts, group=torch.zeros(3))
    with pytest.raises(ValueError, match="preference must be one of"):
        GroupWinRate(Fixed(), preference="soft")
    with pytest.raises(ValueError, match="either base= .* or pairwise="):
        GroupWinRate("shapes", pairwise=lambda a, b, p: 0.5)
    assert rewards.get("group_rank", base="brightness").base.name == "brightness"


class Recorder(GroupRank):
    """A rank reward that records what the rollout hands it."""

    def __init__(self):
        super().__init__(Fixed())
        self.calls = []

    def __call__(self, images, prompts, meta=None, group=None):
        self.calls.append((list(prompts), None if group is None else group.clone()))
        return super().__call__(images, prompts, meta, group=group)


@pytest.mark.parametrize("method", ["flow_grpo", "ddpo"])
def test_online_methods_pass_whole_groups(method):
    from test_online_rl import PROMPTS, build, tiny_model

    model = tiny_model("flow" if method == "flow_grpo" else "epsilon")
    cfg, cls = build(method, beta=0.0, **({"clip_sample": 1.0} if method == "ddpo" else {}))
    reward = Recorder()
    b = cls(cfg, reward=reward).collect(model, PROMPTS, epoch=0, seed=1)
    (prompts, group), = reward.calls
    assert group is not None and group.tolist() == [0] * 4 + [1] * 4
    assert prompts == [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4
    for g in (0, 1):  # each group's rewards are its ranks: a permutation of {0, 1/3, 2/3, 1} without ties
        assert sorted(b.rewards[b.group == g].tolist()) == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_safe_reward_retries_group_by_group():
    images, prompts, group = batch(groups=2, size=3)
    calls = []

    class Flaky(GroupRank):
        def __call__(self, images, prompts, meta=None, group=None):
            calls.append(len(prompts))
            if "prompt 0" in prompts:
                raise RuntimeError("boom")
            return super().__call__(images, prompts, meta, group=group)

    r, failed = safe_reward(Flaky(Fixed()), images, prompts, group=group)
    assert failed == 3 and torch.isnan(r[:3]).all() and torch.isfinite(r[3:]).all()
    assert calls == [6, 3, 3]  # the batch, then each group whole


def test_sharded_rollout_refuses_groups_split_over_processes():
    from test_online_rl import tiny_model

    from diffalign.algorithms._rollout import Shard, rollout

    prompts = ["two red circles", "a red circle", "one blue square"]  # 12 samples, 6 per process: groups split
    with pytest.raises(ValueError, match="scores whole groups.*multiple of group_size"):
        rollout(tiny_model(), prompts, GroupRank(Fixed()), group_size=4, sampler="flow_sde", num_steps=2, eta=0.7,
                guidance_scale=1.0, sde_steps=None, seed=0, shard=Shard(rank=0, world=2))
