"""Reward-model losses: Bradley-Terry, listwise ranking, process rewards, ensembles, objectives."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms import (
    ENSEMBLE_REDUCTIONS,
    OBJECTIVE_COMBINATIONS,
    RANKING_LOSSES,
    aggregate_loss,
    bradley_terry_loss,
    combine_objectives,
    ensemble_reward,
    listwise_ranking_loss,
    mc_value_labels,
    preference_loss,
    process_advantage_labels,
    process_reward_loss,
)

from ._data import DTYPE


def t(*values):
    return torch.tensor(values, dtype=DTYPE)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bradley_terry_by_hand():
    loss = bradley_terry_loss(t(1.0, 0.0), t(0.0, 1.0), margin=t(0.5, 0.0), center_coefficient=0.1)
    torch.testing.assert_close(loss, t(softplus(-0.5) + 0.1 * 1.0, softplus(1.0) + 0.1 * 1.0))
    assert bradley_terry_loss(t(2.0), t(1.0)).item() == pytest.approx(softplus(-1.0))


SCORES = t(2.0, 0.5, 1.0).view(1, 3)
LABELS = t(3.0, 1.0, 2.0).view(1, 3)


def test_pairwise_logistic_by_hand_and_equals_dpo_for_two():
    pairs = [(0, 1), (0, 2), (2, 1)]  # (better, worse)
    expected = sum(softplus(-(SCORES[0, i] - SCORES[0, j]).item()) for i, j in pairs)
    assert listwise_ranking_loss(SCORES, LABELS, method="pairwise_logistic").item() == pytest.approx(expected)
    # K = 2 on implicit rewards beta * log-ratio is DPO.
    c, r, rc, rr = t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.0, -1.5)
    scores = 0.5 * torch.stack([c - rc, r - rr], 1)
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=DTYPE)
    torch.testing.assert_close(
        listwise_ranking_loss(scores, labels, method="pairwise_logistic"),
        preference_loss("sigmoid", c, r, rc, rr, beta=0.5),
    )


def test_listmle_by_hand():
    # Order by label: items 0, 2, 1 -> scores 2.0, 1.0, 0.5.
    s = [2.0, 1.0, 0.5]
    expected = -sum(s[k] - math.log(sum(math.exp(x) for x in s[k:])) for k in range(3))
    assert listwise_ranking_loss(SCORES, LABELS, method="listmle").item() == pytest.approx(expected)


def test_lipo_lambda_by_hand():
    # Ranks by score: item 0 -> 1, item 2 -> 2, item 1 -> 3. Gains 2^y - 1: 7, 1, 3.
    rank = {0: 1, 1: 3, 2: 2}
    gain = {0: 7.0, 1: 1.0, 2: 3.0}
    s = SCORES[0].tolist()
    expected = 0.0
    for i, j in [(0, 1), (0, 2), (2, 1)]:
        delta = abs(gain[i] - gain[j]) * abs(1 / math.log2(1 + rank[i]) - 1 / math.log2(1 + rank[j]))
        expected += delta * softplus(-(s[i] - s[j]))
    assert listwise_ranking_loss(SCORES, LABELS, method="lambda").item() == pytest.approx(expected)


def test_softmax_ranking_by_hand():
    logp = torch.log_softmax(SCORES[0], 0)
    expected = -(3 * logp[0] + 1 * logp[1] + 2 * logp[2]).item() / 6
    assert listwise_ranking_loss(SCORES, LABELS, method="softmax").item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="non-negative"):
        listwise_ranking_loss(SCORES, -LABELS, method="softmax")


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    method=st.sampled_from(sorted(RANKING_LOSSES)),
    pad=st.integers(1, 3),
    perm=st.permutations(range(4)),
)
def test_ranking_losses_padding_and_permutation_invariance(seed, method, pad, perm):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 4, generator=g, dtype=DTYPE)
    labels = torch.stack([torch.randperm(4, generator=g) for _ in range(2)]).to(DTYPE)  # distinct labels
    base = listwise_ranking_loss(scores, labels, method=method)
    idx = torch.tensor(perm)
    torch.testing.assert_close(listwise_ranking_loss(scores[:, idx], labels[:, idx], method=method), base)
    padded_scores = torch.cat([scores, torch.full((2, pad), 50.0, dtype=DTYPE)], 1).requires_grad_(True)
    padded = listwise_ranking_loss(
        padded_scores,
        torch.cat([labels, torch.full((2, pad), 9.0, dtype=DTYPE)], 1),
        torch.cat([torch.ones(2, 4), torch.zeros(2, pad)], 1),
        method=method,
    )
    torch.testing.assert_close(padded, base)
    (grad,) = torch.autograd.grad(padded.sum(), padded_scores)
    assert torch.isfinite(grad).all() and (grad[:, 4:] == 0).all()
    assert base.shape == (2,) and (base >= 0).all()


def test_ranking_losses_prefer_the_right_order():
    labels = t(0.0, 1.0, 2.0, 3.0).view(1, 4)
    good = t(0.0, 1.0, 2.0, 3.0).view(1, 4)
    bad = good.flip(1)
    for method in RANKING_LOSSES:
        assert listwise_ranking_loss(good, labels, method=method) < listwise_ranking_loss(
            bad, labels, method=method
        )


def test_process_reward_loss():
    logits = t(0.0, 2.0, -1.0, 9.0).view(1, 4)
    labels = t(1.0, 0.0, 0.25, 1.0).view(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss = process_reward_loss(logits, labels, mask)
    expected = [
        softplus(-0.0),
        softplus(2.0),
        0.25 * softplus(1.0) + 0.75 * softplus(-1.0),
        0.0,
    ]
    torch.testing.assert_close(loss, t(*expected).view(1, 4))
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(sum(expected) / 3)
    # A two-class head equals one logit = l1 - l0.
    two = torch.stack([torch.zeros_like(logits), logits], -1) + 0.7
    torch.testing.assert_close(process_reward_loss(two, labels, mask), loss)
    # Logits already gathered at the steps: no mask needed.
    torch.testing.assert_close(process_reward_loss(t(0.0, 2.0), t(1.0, 0.0)), t(softplus(0.0), softplus(2.0)))
    mse = process_reward_loss(t(0.5, -0.2).view(1, 2), t(0.25, 0.0).view(1, 2), loss_type="mse")
    torch.testing.assert_close(mse, t(0.0625, 0.04).view(1, 2))
    with pytest.raises(ValueError, match="match"):
        process_reward_loss(logits, labels[:, :2], mask)


def test_mc_labels_and_pav_advantages():
    correct = torch.tensor([0, 3, 8])
    torch.testing.assert_close(mc_value_labels(correct, 8, mode="hard").to(DTYPE), t(0.0, 1.0, 1.0))
    torch.testing.assert_close(mc_value_labels(correct, 8, mode="soft").to(DTYPE), t(0.0, 3 / 8, 1.0))
    values = t(0.6, 0.9, 0.4, 0.5).view(1, 4)
    mask = torch.tensor([[1, 1, 0, 1]])  # the third position is not a step
    torch.testing.assert_close(process_advantage_labels(values, mask, 0.5), t(0.1, 0.3, 0.0, -0.4).view(1, 4))
    per_row = process_advantage_labels(torch.cat([values, values]), torch.cat([mask, mask]), t(0.5, 0.0))
    torch.testing.assert_close(per_row[1], t(0.6, 0.3, 0.0, -0.4))


def test_ensemble_reductions_by_hand():
    rewards = t(1.0, 2.0, 0.0, 4.0, 2.0, 2.0).view(3, 2)  # 3 members, 2 samples
    torch.testing.assert_close(ensemble_reward(rewards, "mean"), t(1.0, 8 / 3))
    torch.testing.assert_close(ensemble_reward(rewards, "wco"), t(0.0, 2.0))
    var = t(2 / 3, 8 / 9)  # population variance across members
    torch.testing.assert_close(ensemble_reward(rewards, "uwo", uwo_coef=0.5), t(1.0, 8 / 3) - 0.5 * var)
    assert set(ENSEMBLE_REDUCTIONS) == {"mean", "wco", "uwo"}
    with pytest.raises(ValueError, match="Did you mean 'wco'"):
        ensemble_reward(rewards, "wc")


def test_objective_combinations_by_hand():
    rewards = t(1.0, 5.0, 3.0, -1.0, 2.0, 0.0).view(3, 2)  # objective means: 2.0 and 4/3
    torch.testing.assert_close(
        combine_objectives(rewards, "weighted_sum", weights=[0.25, 0.75]), t(4.0, 0.0, 0.5)
    )
    torch.testing.assert_close(combine_objectives(rewards), t(3.0, 1.0, 1.0))
    torch.testing.assert_close(combine_objectives(rewards, "maxmin"), t(5.0, -1.0, 0.0))  # worst objective: 1
    torch.testing.assert_close(combine_objectives(rewards, "min"), t(1.0, -1.0, 0.0))
    soft = combine_objectives(rewards, "softmin", temperature=1e-3)
    torch.testing.assert_close(soft, t(1.0, -1.0, 0.0), atol=1e-6, rtol=0)
    assert set(OBJECTIVE_COMBINATIONS) == {"weighted_sum", "maxmin", "min", "softmin"}
    with pytest.raises(ValueError, match="weights"):
        combine_objectives(rewards, weights=[1.0])


def test_pairwise_logistic_counts_every_ordered_pair():
    labels = t(0.0, 1.0, 2.0).view(1, 3)
    scores = torch.zeros(1, 3, dtype=DTYPE)
    n_pairs = len(list(itertools.combinations(range(3), 2)))
    assert listwise_ranking_loss(scores, labels, method="pairwise_logistic").item() == pytest.approx(
        n_pairs * math.log(2)
    )
