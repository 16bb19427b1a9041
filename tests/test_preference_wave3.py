"""Preference optimisation, wave 3: each loss against hand-computed values, the invariants of the
algorithms on a tiny model, the labelling export's annotators and votes flowing into the methods
that use them, resume, configs and bad input. (Inversion: tests/test_inversion.py; it learns:
tests/test_preference_wave3_learns.py.)"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_online_rl import tiny_model, verifier_reward
from test_preference import assert_resume_matches, first_micro
from test_trainer import tiny_dirs  # noqa: F401  (fixture)

from diffalign import algorithms
from diffalign.algorithms.adaptive_dpo import adaptive_dpo_loss, stability
from diffalign.algorithms.balanced_dpo import consensus, consensus_pairs, pairwise_votes, soft_label_dpo_loss
from diffalign.algorithms.dcpo import caption_objects, perturb_prompt
from diffalign.algorithms.dense_reward_dpo import dense_reward_dpo_loss, temporal_discount
from diffalign.algorithms.inversion_preference import implied_noise, smoothed_preference_weight
from diffalign.algorithms.preference import diffusion_dpo_loss
from diffalign.algorithms.ranking import plackett_luce_loss, ranked_lists, ranking_dpo_loss
from diffalign.algorithms.sdpo import sdpo_loss, sdpo_scale
from diffalign.algorithms.video_preference import (dense_dpo_loss, omni_pairs, omni_score, segment_errors,
                                                   weighted_dpo_loss)
from diffalign.core.schedules import FlowSchedule
from diffalign.data import PreferencePair, load_pairs, write_jsonl_pairs
from diffalign.data.votes import VoteStore, export_votes
from diffalign.runtime.lora import Reference
from diffalign.runtime.trainer import TrainConfig
from diffalign.worlds import shapes

PROMPTS = ["two red circles", "a blue square left of a green triangle", "one yellow square", "three purple triangles"]
STEPWISE = ("ipr", "lpo")
sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731


def _pairs_dir(tmp_path, n=8, **kw):
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # noqa: E731
    pairs = [PreferencePair(PROMPTS[i % 4], img(), img(), pair_id=f"p{i}", **kw) for i in range(n)]
    return write_jsonl_pairs(pairs, tmp_path / "pairs" / "pairs.jsonl"), pairs


def build(method, model, **overrides):
    small = {"num_steps": 3} if method in STEPWISE else {"num_steps": 3, "pairs_per_epoch": 4, "micro_batch_size": 4}
    cfg = algorithms.build_config(method, {**small, **overrides})
    _, cls, _ = algorithms.get(method)
    return cls(cfg, reward=verifier_reward, reference=Reference(model) if cfg.beta > 0 else None)


# ----- losses against hand-computed values -----------------------------------------------------------------
def test_sdpo_safeguard_scale_is_the_closed_form_and_scales_only_the_losers_gradient():
    r_w, r_l = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    assert sdpo_scale(r_w, r_l, 0.9).item() == pytest.approx(0.1 * 5 / 1)  # (1 - mu) ||g_w||^2 / <g_w, g_l>
    assert sdpo_scale(r_w, -r_l, 0.9).item() == 1.0  # opposed gradients: no scaling
    assert sdpo_scale(r_w, 0.01 * r_l, 0.0).item() == 1.0  # the cap 500 is clipped to 1
    err_w, err_l = torch.tensor([0.3, 0.5], requires_grad=True), torch.tensor([0.4, 0.45], requires_grad=True)
    ref_w, ref_l = torch.tensor([0.31, 0.49]), torch.tensor([0.38, 0.47])
    loss, stats = sdpo_loss(err_w, err_l, ref_w, ref_l, 2000.0, torch.tensor(0.25))
    dpo, _ = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, 2000.0)
    assert loss.item() == pytest.approx(dpo.item()) and stats["loser_scale"] == 0.25
    g_w, g_l = torch.autograd.grad(loss, [err_w, err_l])
    d_w, d_l = torch.autograd.grad(dpo, [err_w, err_l])
    torch.testing.assert_close(g_w, d_w)
    torch.testing.assert_close(g_l, 0.25 * d_l)


def test_sdpo_step_does_not_raise_the_winners_error_where_dpo_does():
    """A shared output theta for both branches (the output-space proxy is then exact): winner target
    (1, 0), loser target (3, 1). DPO's step moves theta away from the winner; SDPO's does not."""
    t_w, t_l = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0])

    def step(safeguard):
        theta = torch.zeros(2, requires_grad=True)
        err_w, err_l = (theta - t_w).pow(2).mean(), (theta - t_l).pow(2).mean()
        lam = sdpo_scale((theta - t_w)[None], (theta - t_l)[None], 0.9) if safeguard else 1.0
        loss, _ = sdpo_loss(err_w[None], err_l[None], err_w.detach()[None], err_l.detach()[None], 10.0, lam)
        (g,) = torch.autograd.grad(loss, theta)
        new = theta.detach() - 1e-3 * g
        return (new - t_w).pow(2).mean().item() - err_w.item()

    assert step(False) > 0 and step(True) < 0


def test_plackett_luce_reduces_to_dpo_for_two_items_and_matches_a_hand_computed_list():
    g = torch.Generator().manual_seed(0)
    err, ref = torch.rand(5, 2, generator=g), torch.rand(5, 2, generator=g)
    pl, _ = ranking_dpo_loss(err, ref, 300.0)
    dpo, _ = diffusion_dpo_loss(err[:, 0], err[:, 1], ref[:, 0], ref[:, 1], 300.0)
    assert pl.item() == pytest.approx(dpo.item(), rel=1e-6)
    r = torch.tensor([[2.0, 1.0, 0.0]])
    e = math.e
    expected = -(2 - math.log(e**2 + e + 1)) - (1 - math.log(e + 1))
    assert plackett_luce_loss(r).item() == pytest.approx(expected, rel=1e-6)
    padded = plackett_luce_loss(torch.tensor([[2.0, 1.0, 5.0]]), torch.tensor([[True, True, False]]))
    assert padded.item() == pytest.approx(-math.log(sig(1.0)), rel=1e-6)  # the padding is ignored
    # lists: by decreasing reward, a tie with an earlier sample dropped, a gap above min_margin required
    lists, mask = ranked_lists(torch.tensor([0.2, 0.9, 0.5, 0.9, 0.3, 0.3, 0.3, 0.31]),
                               torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), min_margin=0.05)
    assert lists.tolist() == [[1, 2, 0]] and mask.tolist() == [[True, True, True]]


def test_balanced_dpo_consensus_on_a_hand_made_score_table():
    # three samples of one prompt scored by three metrics (rows: samples)
    scores = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.5, 0.5, 0.1]])
    torch.testing.assert_close(pairwise_votes(scores[0], scores[1]), torch.tensor([1.0, 0.0, 0.5]))
    group = torch.zeros(3, dtype=torch.long)
    # weights (2, 1, 1): p(0>1) = 2.5/4, p(0>2) = 3/4, p(1>2) = 2/4 (a tie): the strongest is 0 over 2
    chosen, rejected, votes = consensus_pairs(scores, group, torch.tensor([2.0, 1.0, 1.0]))
    assert chosen.tolist() == [0] and rejected.tolist() == [2] and votes.tolist() == [[1.0, 0.0, 1.0]]
    assert consensus(votes, torch.tensor([2.0, 1.0, 1.0])).item() == pytest.approx(0.75)
    # metric 2 alone outweighing the others turns the pair round: 2 over 1 by (0, 0, 1) votes... oriented p > 1/2
    chosen, rejected, votes = consensus_pairs(scores, group, torch.tensor([0.1, 0.1, 5.0]))
    assert consensus(votes, torch.tensor([0.1, 0.1, 5.0])).item() > 0.5
    assert (chosen.item(), rejected.item()) in ((0, 2), (1, 2))
    # soft labels: p = 1 is Diffusion-DPO's loss, p = 1/2 is minimised at margin 0
    m = torch.tensor([0.7, -0.2])
    assert soft_label_dpo_loss(m, torch.ones(2)).item() == pytest.approx(-F.logsigmoid(m).mean().item())
    assert soft_label_dpo_loss(m, torch.full((2,), 0.5)).item() > soft_label_dpo_loss(torch.zeros(2), torch.full((2,), 0.5)).item()


def test_balanced_dpo_adaptive_weights_favour_the_lagging_metric():
    model = tiny_model()
    algo = build("balanced_dpo", model, metrics=["shapes", "brightness"], adaptive_temperature=0.1)
    algo.acc = torch.tensor([0.9, 0.5])  # the policy agrees with metric 0 far more often
    w = algo.weights()
    assert w[1] / w[0] == pytest.approx(math.exp(0.4 / 0.1), rel=1e-5) and w.sum().item() == pytest.approx(2.0)
    fixed = build("balanced_dpo", model, metrics=["shapes", "brightness"], adaptive=False, metric_weights=[3.0, 1.0])
    fixed.acc = torch.tensor([0.9, 0.5])
    assert fixed.weights().tolist() == [3.0, 1.0]


def test_dense_reward_discount_weights_and_loss():
    t = torch.tensor([1.0, 0.5, 0.0])
    torch.testing.assert_close(temporal_discount(t, 0.9, 10), torch.tensor([1.0, 0.9**5, 0.9**10], dtype=torch.float64))
    err_w, err_l = torch.tensor([0.30, 0.50]), torch.tensor([0.40, 0.45])
    ref_w, ref_l = torch.tensor([0.31, 0.49]), torch.tensor([0.38, 0.47])
    loss, stats = dense_reward_dpo_loss(err_w, err_l, ref_w, ref_l, torch.tensor([0.8, 0.2]), 1000.0, 0.9, 10)
    inside = [-1000 * 0.5 * 0.9 ** (10 * (1 - tt)) * ((w - rw) - (lo - rl)) for tt, w, lo, rw, rl in
              zip([0.8, 0.2], err_w.tolist(), err_l.tolist(), ref_w.tolist(), ref_l.tolist())]
    assert loss.item() == pytest.approx(sum(-math.log(sig(x)) for x in inside) / 2, rel=1e-5)
    one, _ = dense_reward_dpo_loss(err_w, err_l, ref_w, ref_l, torch.tensor([0.8, 0.2]), 1000.0, 1.0, 10)
    assert one.item() == pytest.approx(diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, 1000.0)[0].item())


def test_adaptive_dpo_margin_from_vote_stability():
    s = stability(torch.tensor([2.0, 3.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(s, torch.tensor([1 / 3, 1.0, 0.0, 1.0]))  # no decisive vote: no dispute evidence
    err_w, err_l = torch.tensor([0.30, 0.50]), torch.tensor([0.40, 0.45])
    ref_w, ref_l = torch.tensor([0.31, 0.49]), torch.tensor([0.38, 0.47])
    loss, _ = adaptive_dpo_loss(err_w, err_l, ref_w, ref_l, torch.tensor([1 / 3, 1.0]), 100.0, 2.0)
    m = [-50 * ((w - rw) - (lo - rl)) for w, lo, rw, rl in zip(err_w.tolist(), err_l.tolist(), ref_w.tolist(),
                                                               ref_l.tolist())]
    d = [2.0 * (2 / 3 - 1), 2.0 * (2 - 1)]
    assert loss.item() == pytest.approx(sum(-math.log(sig(x - y)) for x, y in zip(m, d)) / 2, rel=1e-5)
    # at margin 0 a unanimous pair pulls harder than a split one
    zero = torch.zeros(2, requires_grad=True)
    adaptive_dpo_loss(zero, torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.tensor([1.0, 0.0]), 1.0, 2.0)[0].backward()
    assert abs(zero.grad[0]) > 5 * abs(zero.grad[1])


def test_smpo_smoothed_weight_and_implied_noise():
    w = smoothed_preference_weight(torch.tensor([0.8, 0.6, 0.5]), torch.tensor([0.6, 0.8, 0.5]), 0.1, 10.0)
    torch.testing.assert_close(w, torch.tensor([10 * math.tanh(1.0), -10 * math.tanh(1.0), 0.0]))
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([0.3, 0.9])
    x_t = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * e
    torch.testing.assert_close(implied_noise(x0, x_t, t, FlowSchedule()), e, rtol=1e-4, atol=1e-5)


def test_video_losses_on_hand_made_5d_latents():
    res = torch.zeros(1, 2, 4, 2, 2)  # [B, C, F, H, W]
    res[:, :, 0] = 1.0
    res[:, :, 3] = 2.0
    torch.testing.assert_close(segment_errors(res, 2), torch.tensor([[0.5, 2.0]]))  # frames {0, 1} and {2, 3}
    with pytest.raises(ValueError, match="num_segments must be in"):
        segment_errors(res, 5)
    err_a, err_b = torch.tensor([[0.3, 0.5, 0.2]]), torch.tensor([[0.4, 0.45, 0.2]])
    ref_a, ref_b = torch.tensor([[0.31, 0.49, 0.25]]), torch.tensor([[0.38, 0.47, 0.2]])
    loss, stats = dense_dpo_loss(err_a, err_b, ref_a, ref_b, torch.tensor([[1, 0, -1]]), 200.0)
    m = [-100 * ((a - ra) - (b - rb)) for a, b, ra, rb in zip(err_a[0].tolist(), err_b[0].tolist(), ref_a[0].tolist(),
                                                              ref_b[0].tolist())]
    assert loss.item() == pytest.approx((-math.log(sig(m[0])) - math.log(sig(-m[2]))) / 2, rel=1e-5)
    assert stats["labelled_frac"] == pytest.approx(2 / 3)
    whole, _ = dense_dpo_loss(err_a[:, :1], err_b[:, :1], ref_a[:, :1], ref_b[:, :1], torch.tensor([[1]]), 200.0)
    assert whole.item() == pytest.approx(diffusion_dpo_loss(err_a[0, :1], err_b[0, :1], ref_a[0, :1], ref_b[0, :1],
                                                            200.0)[0].item())
    # VideoDPO: OmniScore = mean of per-prompt standardised quality and alignment; best vs worst; gap weights
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [0.0, 0.0], [1.0, 1.0], [5.0, 1.0]])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    omni = omni_score(scores, group)
    assert omni[2] > omni[0] == pytest.approx(omni[1].item())
    chosen, rejected, w = omni_pairs(scores, group, alpha=1.0)
    assert chosen.tolist() == [2, 5] and rejected.tolist() == [0, 3] and w.mean().item() == pytest.approx(1.0)
    g = (omni[2] - omni[0]) / (omni[5] - omni[3])
    assert (w[0] / w[1]).item() == pytest.approx(g.item(), rel=1e-5)
    ew, el = torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.45])
    assert weighted_dpo_loss(ew, el, ew + 0.01, el, torch.ones(2), 100.0)[0].item() == pytest.approx(
        diffusion_dpo_loss(ew, el, ew + 0.01, el, 100.0)[0].item())


def test_dcpo_captions_and_perturbations_are_valid_distractors():
    a = {"color": "red", "shape": "circle", "center": (8.0, 16.0)}
    b = {"color": "blue", "shape": "square", "center": (24.0, 16.0)}
    assert caption_objects([a, b]) == "a red circle left of a blue square"
    assert caption_objects([a, dict(a, center=(20.0, 5.0)), dict(a, center=(3.0, 3.0))]) == "three red circles"
    assert caption_objects([]) == "" and caption_objects([dict(a, color="unknown")]) == ""
    assert caption_objects([a, dict(a, center=(20.0, 5.0)), b]) == "two red circles"  # the most frequent kind
    rng = np.random.default_rng(0)
    for p in PROMPTS * 5:
        q = perturb_prompt(p, rng)
        assert q != p and shapes.is_prompt(q) and shapes.parse(q).kind == shapes.parse(p).kind


# ----- invariants on a tiny model ---------------------------------------------------------------------------
AT_INIT = {"sdpo": {}, "inpo": {}, "smpo": {}, "inversion_dpo": {"inversion_steps": 3}, "dense_reward_dpo": {},
           "dcpo": {}, "balanced_dpo": {"metrics": ["shapes", "brightness"]}, "ppd": {"users": {"b": "brightness"}},
           "ranking_dpo": {"group_size": 2}, "ipr": {"threshold": 0.0, "prompts_per_epoch": 4}}


@pytest.mark.parametrize("method", list(AT_INIT))
def test_at_initialisation_the_loss_is_log_2(method):
    model = tiny_model()
    algo = build(method, model, **AT_INIT[method])
    batch = algo.collect(model, PROMPTS, epoch=0, seed=1)
    assert batch.info["pairs"] > 0
    loss, stats = algo.loss(model, first_micro(algo, batch))
    assert loss.item() == pytest.approx(math.log(2), abs=2e-4)
    assert torch.isfinite(loss)


def test_ranking_dpo_lists_share_timestep_and_noise_and_reversing_a_pair_reverses_the_gradient():
    model = tiny_model()
    algo = build("ranking_dpo", model, group_size=4)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=2)
    micro = first_micro(algo, batch)
    K = batch.lists.shape[1]
    assert torch.equal(micro.t.view(-1, K), micro.t.view(-1, K)[:, :1].expand(-1, K))
    r = batch.rewards
    for lst, m in zip(batch.lists.tolist(), batch.mask.tolist()):
        real = [i for i, keep in zip(lst, m) if keep]
        assert all(r[a] > r[b] for a, b in zip(real, real[1:]))
    two = build("ranking_dpo", model, group_size=2)
    b2 = two.collect(model, PROMPTS, epoch=0, seed=2)

    def grad(batch):
        model.zero_grad()
        two.loss(model, first_micro(two, batch))[0].backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    g = grad(b2)
    b2.lists = b2.lists.flip(1)
    assert F.cosine_similarity(g, grad(b2), dim=0) < -0.9999


@pytest.mark.parametrize("method,kw", [("sdpo", {}), ("ranking_dpo", {"group_size": 4}), ("self_npo", {}),
                                       ("dense_reward_dpo", {})])
def test_several_timesteps_per_pair_reach_every_wave3_plan(method, kw):
    """``timesteps_per_pair: 2`` (docs/algorithms/preference.md) puts every pair / list / sample in the
    plan twice, each time with its own noise, through the shared ``_micro`` hook or Self-NPO's plan."""
    model = tiny_model()
    one, two = (build(method, model, timesteps_per_pair=k, micro_batch_size=64, **kw) for k in (1, 2))
    batch = one.collect(model, PROMPTS, epoch=0, seed=2)
    m1, m2 = first_micro(one, batch), first_micro(two, batch)
    assert len(m1.idx) > 0 and sorted(m2.idx.tolist()) == sorted(m1.idx.tolist() * 2)
    for i in m1.idx.unique().tolist():
        draws = m2.noise[m2.idx == i]
        assert not torch.equal(draws[0], draws[-1])  # two draws of that sample
    assert torch.isfinite(two.loss(model, m2)[0])


def test_dcpo_conditions_the_rejected_image_on_its_distractor():
    model = tiny_model()
    algo = build("dcpo", model, distractor="perturb")
    batch = algo.collect(model, PROMPTS, epoch=0, seed=3)
    d = algo.distractors(batch, 3)
    enc = model.encode_prompts([batch.prompts[i] for i in batch.chosen.tolist()] + d)
    torch.testing.assert_close(batch.cond.tokens[torch.cat([batch.chosen, batch.rejected])], enc.tokens)
    assert batch.prompts == build("dpo", model).collect(model, PROMPTS, epoch=0, seed=3).prompts  # rewards see the prompts
    with pytest.raises(ValueError, match="needs shapes-world prompts"):
        algo.distractors(type(batch)(**{**vars(batch), "prompts": ["a photo of a cat"] * len(batch)}), 0)


def test_inversion_dpo_inverts_once_per_epoch_with_the_reference_and_trains_on_its_grid():
    model = tiny_model()
    algo = build("inversion_dpo", model, inversion_steps=4)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=4)
    assert batch.inverted.shape == (len(batch), 5, *batch.x0.shape[1:])
    idx = torch.cat([batch.chosen, batch.rejected])
    torch.testing.assert_close(batch.inverted[idx, 0], batch.x0[idx])
    micro = algo._inverted_micro(model, first_micro(algo, batch))
    assert set(micro.t.tolist()) <= {0.25, 0.5, 0.75, 1.0}
    with torch.no_grad():  # the policy moving does not change the reference's inversion
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    again = algo.collect(model, PROMPTS, epoch=0, seed=4)
    torch.testing.assert_close(again.inverted[idx], batch.inverted[idx])


def test_self_npo_regresses_the_frozen_models_truncated_estimate():
    model = tiny_model()
    algo = build("self_npo", model, truncation_steps=2, num_ddim_steps=4)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=5)
    assert len(batch.chosen) == len(batch) == 8 and len(batch.rejected) == 0
    micro = first_micro(algo, batch)
    x_e, t_e, target = algo.truncated_target(micro, model.schedule, model.prediction_type)
    grid = model.schedule.timesteps(4)
    expected_end = grid[(micro.start + 2).clamp(max=4)]
    torch.testing.assert_close(t_e.float(), expected_end.float())
    loss, _ = algo.loss(model, micro)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_ppd_users_get_their_own_context_token_and_a_personalised_model_samples():
    from diffalign.algorithms.ppd import personalize
    from diffalign.core.sampling import generate

    model = tiny_model()
    algo = build("ppd", model, users={"bright": "brightness", "correct": "shapes"}, shots=2)
    batch = algo.collect(model, PROMPTS, epoch=0, seed=6)
    L = model.encode_prompts(PROMPTS[:1]).tokens.shape[1]
    assert batch.cond.tokens.shape[1] == L + 1 and set(algo.embeddings) == {"bright", "correct"}
    users = batch.users
    tok = batch.cond.tokens[:, -1]
    for i in range(len(users)):
        same = [j for j in range(len(users)) if users[j] == users[i]]
        assert all(torch.allclose(tok[i], tok[j]) for j in same)
    assert not torch.allclose(tok[users.index("bright")], tok[users.index("correct")])
    a = generate(personalize(model, algo.embeddings["bright"], algo.cfg), PROMPTS[:2], [0, 1], num_steps=3,
                 guidance_scale=3.0)
    b = generate(personalize(model, algo.embeddings["correct"], algo.cfg), PROMPTS[:2], [0, 1], num_steps=3,
                 guidance_scale=3.0)
    assert a.shape == (2, 3, 32, 32) and not torch.allclose(a, b)


# ----- annotator ids and disagreement from the labelling export --------------------------------------------
def _labelled_export(tmp_path, per_annotator):
    path, pairs = _pairs_dir(tmp_path, n=4)
    store = VoteStore(tmp_path / "votes.sqlite")
    # p0 unanimous for a, p1 split 2:1 for b, p2 unanimous for b, p3 2:1 for a
    for name, votes in {"alice": "abba", "bob": "abbb", "carol": "aaba"}.items():
        for pid, c in zip(("p0", "p1", "p2", "p3"), votes):
            store.vote(name, pid, c)
    store.close()
    out = tmp_path / ("per.jsonl" if per_annotator else "labelled.jsonl")
    export_votes(path.parent, tmp_path / "votes.sqlite", out, per_annotator=per_annotator)
    return out


def test_votes_from_the_labelling_export_set_adaptive_dpos_per_pair_margins(tmp_path):
    out = _labelled_export(tmp_path, per_annotator=False)
    assert [p.votes for p in load_pairs(out)] == [(3, 0, 0), (2, 1, 0), (3, 0, 0), (2, 1, 0)]
    model = tiny_model()
    algo = build("adaptive_dpo", model, source="file", data=str(out), pairs_per_epoch=4)
    batch = algo.collect(model, [], epoch=0, seed=0)
    by_id = {p.pair_id: s.item() for p, s in zip(batch.source_pairs, batch.stability)}
    assert by_id == pytest.approx({"p0": 1.0, "p1": 1 / 3, "p2": 1.0, "p3": 1 / 3})
    micro = first_micro(algo, batch)
    loss, stats = algo.loss(model, micro)
    assert stats["disputed_frac"] == pytest.approx(np.mean([by_id[batch.source_pairs[i].pair_id] < 1 for i in
                                                            micro.idx[:len(micro.idx) // 2].tolist()]))
    # without votes or a panel there is nothing to adapt to
    plain, _ = _pairs_dir(tmp_path / "plain")
    with pytest.raises(ValueError, match="no pair of .* carries votes"):
        build("adaptive_dpo", model, source="file", data=str(plain)).collect(model, [], epoch=0, seed=0)


def test_annotators_from_the_per_annotator_export_group_ppds_pairs(tmp_path):
    model = tiny_model()
    out = _labelled_export(tmp_path, per_annotator=True)
    got = load_pairs(out)
    assert sorted({p.annotator for p in got}) == ["alice", "bob", "carol"] and len(got) == 12
    algo = build("ppd", model, source="file", data=str(out), pairs_per_epoch=12, shots=2)
    batch = algo.collect(model, [], epoch=0, seed=0)
    assert set(algo.embeddings) == {"alice", "bob", "carol"}
    assert batch.users[:12] == [p.annotator for p in batch.source_pairs]
    merged = _labelled_export(tmp_path / "m", per_annotator=False)
    with pytest.raises(ValueError, match="--per-annotator"):
        build("ppd", model, source="file", data=str(merged)).collect(model, [], epoch=0, seed=0)


def test_dcpo_reads_rejected_prompts_from_a_pairs_file_and_balanced_dpo_can_overrule_its_label(tmp_path):
    model = tiny_model()
    path, _ = _pairs_dir(tmp_path, rejected_prompt="four green squares")
    algo = build("dcpo", model, source="file", data=str(path), distractor="file")
    batch = algo.collect(model, [], epoch=0, seed=0)
    torch.testing.assert_close(batch.cond.tokens[batch.rejected],
                               model.encode_prompts(["four green squares"] * len(batch.rejected)).tokens)
    bal = build("balanced_dpo", model, source="file", data=str(path), metrics=["brightness", "saturation"],
                adaptive=False)
    batch = bal.collect(model, [], epoch=0, seed=0)
    votes = batch.votes
    assert torch.all(votes[:, -1] >= 0) and torch.all(consensus(votes, bal.weights()) > 0.5)
    assert 0 <= batch.info["label_flipped"] <= 1


# ----- resume, configs, bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,extra", [
    ("balanced_dpo", {"source": "policy", "metrics": ["shapes", "brightness", "saturation"], "beta": 250.0,
                      "group_size": 4}),  # metrics that disagree, so the adaptive weights move
    ("ppd", {"users": {"b": "brightness", "c": "shapes"}, "shots": 2}),
    ("inversion_dpo", {"inversion_steps": 2}),
    ("self_npo", {"num_ddim_steps": 4, "truncation_steps": 2}),
    ("lpo", {"lrm_steps": 3, "threshold": 0.5, "max_t": 1.0}),
])
def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tiny_dirs, tmp_path, method, extra):  # noqa: F811
    if method == "lpo":
        path, _ = _pairs_dir(tmp_path)
        extra = {**extra, "lrm_data": str(path)}
    small = {"num_steps": 3, "prompts_per_epoch": 2} if method in STEPWISE else \
        {"num_steps": 3, "pairs_per_epoch": 3, "group_size": 3}
    cfg = TrainConfig(model=str(tiny_dirs / "flow"), method=method, epochs=3, checkpoint_every=1, lr=1e-3,
                      algorithm={**small, **extra})
    assert_resume_matches(cfg, tmp_path)


WAVE3 = ["sdpo", "smpo", "inpo", "inversion_dpo", "lpo", "self_npo", "balanced_dpo", "dense_reward_dpo", "ipr",
         "ranking_dpo", "dcpo", "adaptive_dpo", "ppd", "ppd_file"]


@pytest.mark.parametrize("name", WAVE3)
def test_shipped_configs_are_valid(name):
    from pathlib import Path

    from diffalign.config import load_config

    cfg = load_config(TrainConfig, Path(__file__).resolve().parents[1] / "configs" / f"{name}_shapes.yaml")
    algo = algorithms.build_config(cfg.method, cfg.algorithm)
    assert cfg.method == name.removesuffix("_file") and algo.prompts_per_epoch > 0 and cfg.model == "shapes-flow"


@pytest.mark.parametrize("method,overrides,message", [
    ("sdpo", {"mu": 1.5}, "mu must be in [0, 1], got 1.5"),
    ("inpo", {"inversion_model": "ema"}, "inversion_model must be one of"),
    ("smpo", {"renoise_steps": -1}, "renoise_steps must be an integer in [0, inf), got -1"),
    ("inversion_dpo", {"t_max": 0.0}, "t_max must be in (0, 1], got 0.0"),
    ("inpo", {"uncond_fraction": 0.5}, "prompt dropout is not supported"),
    ("dense_reward_dpo", {"gamma": 1.5}, "gamma must be in (0, 1], got 1.5"),
    ("dcpo", {"distractor": "llm"}, "distractor must be one of"),
    ("dcpo", {"distractor": "file"}, "needs source 'file'"),
    ("balanced_dpo", {"metrics": []}, "metrics must be a non-empty list"),
    ("balanced_dpo", {"metric_weights": [1.0]}, "one weight per metric (3), got 1"),
    ("adaptive_dpo", {}, "give a `panel` of reward names"),
    ("adaptive_dpo", {"panel": ["brightness"], "gamma": -1.0}, "gamma must be in [0, inf), got -1.0"),
    ("ppd", {}, "give `users`"),
    ("ppd", {"source": "file", "data": "x.jsonl", "users": {"a": "brightness"}}, "leave `users` empty"),
    ("self_npo", {"source": "policy"}, "source must be 'reference' or 'file'"),
    ("self_npo", {"truncation_steps": 0}, "truncation_steps must be an integer in (0, inf), got 0"),
    ("lpo", {}, "lpo needs `lrm_data`"),
    ("lpo", {"lrm_data": "x", "threshold": 0.4}, "threshold must be in [0.5, 1), got 0.4"),
    ("ipr", {"continue_from": "worst"}, "continue_from must be one of"),
])
def test_bad_config_is_a_clear_error(method, overrides, message):
    with pytest.raises(ValueError) as e:
        algorithms.build_config(method, overrides)
    assert message in str(e.value)


def _brightness(images, prompts, meta=None):
    return images.float().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("step_score", ["x0_hat", "rollout"])
def test_ipr_window_pairs_only_the_noisy_steps_and_rollout_ranks_by_the_continuations_reward(step_score):
    """``t_min``: candidates and pairs only at the steps that start at ``t >= t_min``; ``step_score:
    rollout``: the preferred candidate is the one whose deterministic continuation (Euler steps of
    the flow ODE, here by hand) ends brighter."""
    from diffalign.core.parametrization import guided_prediction
    from diffalign.core.steps import get_step

    model = tiny_model()
    cfg = algorithms.build_config("ipr", {"num_steps": 4, "t_min": 0.6, "step_score": step_score, "threshold": 0.0,
                                          "guidance_scale": 1.0, "step_reward": ""})
    _, cls, _ = algorithms.get("ipr")
    algo = cls(cfg, reward=_brightness, reference=Reference(model))
    with torch.no_grad():
        b = algo.collect(model, PROMPTS, epoch=0, seed=3)
    assert b.t.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert set(b.step.tolist()) == {0, 1}  # t = 1 and 0.75; 0.5 < t_min draws one sample and no pair
    assert len(b.step) == 2 * len(PROMPTS)  # brightness never ties: every sample, every window step
    assert b.images.shape[0] == len(PROMPTS)
    if step_score == "x0_hat":
        return
    ode = get_step("flow_ode")
    with torch.no_grad():
        for q in range(len(b.step)):
            j, cond = int(b.step[q]), model.encode_prompts([PROMPTS[int(b.owner[q])]])
            ends = []
            for x in (b.x_w[q:q + 1], b.x_l[q:q + 1]):
                for k in range(j + 1, 4):
                    out = guided_prediction(model, x, b.t[k].float().expand(1), cond, None, 1.0)
                    x = ode(x, out, b.t[k], b.t[k + 1], schedule=model.schedule,
                            prediction_type=model.prediction_type).prev_sample
                ends.append(_brightness(model.decode(x), None).item())
            assert ends[0] > ends[1]


def test_ipr_rollout_score_names_the_field_and_lpo_refuses_it():
    with pytest.raises(ValueError, match="step_score must be one of"):
        algorithms.build_config("ipr", {"step_score": "final"})
    with pytest.raises(ValueError, match=r"t_min must be in \[0, 1\), got 1.0"):
        algorithms.build_config("ipr", {"t_min": 1.0})
    with pytest.raises(ValueError, match="lpo ranks candidates with its latent reward model: step_score must be "
                                         "'x0_hat', got 'rollout'"):
        algorithms.build_config("lpo", {"lrm_data": "x", "step_score": "rollout"})
