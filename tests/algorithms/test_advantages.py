"""Advantage estimators, the SPO tracker and sample filters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms import (
    SPOValueTracker,
    discounted_returns,
    dynamic_sampling_mask,
    gae_advantages,
    group_advantages,
    pf_ppo_filter,
    pf_ppo_weights,
    policy_divergence,
    reinforce_pp_advantages,
)

from ._data import DTYPE


def t(*values):
    return torch.tensor(values, dtype=DTYPE)


def test_grpo_by_hand():
    # Group [1, 0, 1, 1]: mean 0.75, unbiased std 0.5.
    adv = group_advantages("grpo", t(1, 0, 1, 1, 2, 2, 2, 2), 4, eps=0.0)
    torch.testing.assert_close(adv, t(0.5, -1.5, 0.5, 0.5, 0, 0, 0, 0))
    none = group_advantages("grpo", t(1, 0, 1, 1), 4, scale="none")
    torch.testing.assert_close(none, t(0.25, -0.75, 0.25, 0.25))
    torch.testing.assert_close(group_advantages("dr_grpo", t(1, 0, 1, 1), 4), none)
    batch = group_advantages("grpo", t(1, 0, 3, 3), 2, scale="batch", eps=0.0)
    std = t(1, 0, 3, 3).std()
    torch.testing.assert_close(batch, t(0.5, -0.5, 0, 0) / std)


def test_rloo_by_hand():
    adv = group_advantages("rloo", t(1, 0, 1, 1), 4)
    torch.testing.assert_close(adv, t(1 - 2 / 3, 0 - 1, 1 - 2 / 3, 1 - 2 / 3))
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages("rloo", t(1, 0), 1)


def test_reinforce_pp_baseline_by_hand():
    rewards = t(1, 0, 0, 0)
    centred = t(0.5, -0.5, 0, 0)
    adv = group_advantages("reinforce_pp_baseline", rewards, 2, eps=0.0)
    torch.testing.assert_close(adv, (centred - centred.mean()) / centred.std(unbiased=False))
    # Token-weighted statistics: a sequence with 3 response tokens counts 3 times.
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 0, 0]])
    weighted = group_advantages("reinforce_pp_baseline", rewards, 2, mask=mask, eps=0.0)
    expanded = t(0.5, 0.5, 0.5, -0.5, 0, 0)
    torch.testing.assert_close(weighted, (centred - expanded.mean()) / expanded.std(unbiased=False))


def _bnpo_reference(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """BNPO written out with torch.distributions.Beta, as in the paper's code."""
    groups = rewards.view(-1, group_size)
    p = groups.mean(1)
    m, v = p.mean(), p.var()
    a = (m * (1 - m) / v - 1) * m
    b = (m * (1 - m) / v - 1) * (1 - m)
    alpha, beta = torch.clamp(1 + a / 3, min=1.0), torch.clamp(1 + b / 3, min=1.0)
    out = torch.empty_like(rewards)
    for i in range(rewards.numel()):
        pi = p[i // group_size]
        density = torch.distributions.Beta(alpha, beta).log_prob(pi).exp()
        out[i] = torch.clamp(1 / density, max=1e6) * (rewards[i] - pi)
    return out


def test_bnpo_against_beta_density():
    rewards = t(1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 0)
    torch.testing.assert_close(group_advantages("bnpo", rewards, 4), _bnpo_reference(rewards, 4))
    # Rewards outside [0, 1] are mapped there first.
    torch.testing.assert_close(
        group_advantages("bnpo", rewards * 4 - 2, 4, reward_min=-2.0, reward_max=2.0),
        _bnpo_reference(rewards, 4),
    )
    # All groups at the same success rate: uniform density, weight 1.
    same = t(1, 0, 1, 0)
    torch.testing.assert_close(group_advantages("bnpo", same, 2), t(0.5, -0.5, 0.5, -0.5))
    with pytest.raises(ValueError, match="within"):
        group_advantages("bnpo", t(2, 0), 2)


def test_remax_reinforce_and_spo_estimators():
    torch.testing.assert_close(
        group_advantages("remax", t(1, 0.5, 2), 1, baseline_rewards=t(0.5, 0.5, 3)), t(0.5, 0, -1)
    )
    torch.testing.assert_close(group_advantages("reinforce", t(1, 0.5), 1), t(1, 0.5))
    with pytest.raises(ValueError, match="baseline_rewards"):
        group_advantages("remax", t(1, 0.5), 1, baseline_rewards=t(1))
    tracker = SPOValueTracker()
    adv = group_advantages("spo", t(1, 0, 1), 1, tracker=tracker, keys=["a", "b", "c"])
    centred = t(0.5, -0.5, 0.5)
    torch.testing.assert_close(adv, (centred - centred.mean()) / (centred.std() + 1e-8))


def test_unscorable_rewards_get_zero_advantage():
    rewards = t(1, float("nan"), 0, 1)
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        adv = group_advantages(name, rewards, 4)
        assert adv[1] == 0 and torch.isfinite(adv).all(), name
    torch.testing.assert_close(group_advantages("dr_grpo", rewards, 4), t(1 / 3, 0, -2 / 3, 1 / 3))


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="Did you mean 'rloo'"):
        group_advantages("rlooo", t(1, 0), 2)
    with pytest.raises(ValueError, match="whole number of groups"):
        group_advantages("grpo", t(1, 0, 1), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages("grpo", t(1, 0), 2, scale="rank")


def test_advantages_are_detached():
    rewards = t(1, 0, 0.5, 0.2).requires_grad_(True)
    assert not group_advantages("grpo", rewards, 2).requires_grad


# Half-integers keep the group statistics exact enough for tight comparisons.
group_rewards = st.lists(st.integers(-20, 20).map(lambda k: k / 2), min_size=12, max_size=12)


@settings(max_examples=40, deadline=None)
@given(
    values=group_rewards,
    shifts=st.lists(st.floats(-100, 100), min_size=3, max_size=3),
    scale=st.floats(0.1, 10),
)
def test_group_invariances(values, shifts, scale):
    """Adding a constant to one group's rewards changes none of its advantages (grpo, dr_grpo, rloo,
    reinforce_pp_baseline); a positive scale leaves GRPO unchanged and scales dr_grpo/rloo."""
    rewards = t(*values)
    shifted = rewards + t(*shifts).repeat_interleave(4)
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        kw = {"eps": 0.0} if name == "grpo" else {}
        torch.testing.assert_close(
            group_advantages(name, shifted, 4, **kw),
            group_advantages(name, rewards, 4, **kw),
            atol=1e-7,
            rtol=1e-7,
        )
    torch.testing.assert_close(
        group_advantages("grpo", rewards * scale, 4, eps=0.0),
        group_advantages("grpo", rewards, 4, eps=0.0),
        atol=1e-7,
        rtol=1e-7,
    )
    for name in ("dr_grpo", "rloo"):
        torch.testing.assert_close(
            group_advantages(name, rewards * scale, 4),
            scale * group_advantages(name, rewards, 4),
            atol=1e-7,
            rtol=1e-7,
        )
    # Group-centred estimators sum to zero within each group.
    for name in ("dr_grpo", "rloo", "grpo"):
        sums = group_advantages(name, rewards, 4).view(3, 4).sum(1)
        torch.testing.assert_close(sums, torch.zeros(3, dtype=DTYPE), atol=1e-7, rtol=0)


@settings(max_examples=30, deadline=None)
@given(values=group_rewards, perm=st.permutations(range(4)))
def test_permutation_equivariance_within_groups(values, perm):
    rewards = t(*values)
    idx = torch.tensor(perm)
    order = torch.cat([idx + 4 * g for g in range(3)])
    for name in ("grpo", "dr_grpo", "rloo", "bnpo", "reinforce_pp_baseline"):
        r = rewards if name != "bnpo" else (rewards > 0).to(DTYPE)
        torch.testing.assert_close(group_advantages(name, r[order], 4), group_advantages(name, r, 4)[order])


def test_gae_by_hand():
    rewards = t(0.0, 0.0, 1.0).unsqueeze(0)
    values = t(0.5, 0.6, 0.7).unsqueeze(0)
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.7
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, t(a0, a1, a2).unsqueeze(0))
    torch.testing.assert_close(ret, adv + values)
    # lam = 1, gamma = 1: Monte-Carlo return minus the value.
    mc, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(mc, t(0.5, 0.4, 0.3).unsqueeze(0))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    gap_at=st.integers(1, 4),
    pad=st.integers(1, 3),
    gamma=st.floats(0.5, 1.0),
    lam=st.floats(0.0, 1.0),
)
def test_gae_ignores_masked_positions(seed, gap_at, pad, gamma, lam):
    """Masked positions -- right padding, or a gap such as tool output inside the response -- holding
    junk change nothing at the real positions."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(2, 5, generator=g, dtype=DTYPE)
    values = torch.randn(2, 5, generator=g, dtype=DTYPE)
    mask = torch.ones(2, 5)
    base_adv, base_ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    junk = torch.full((2, 1), 77.0, dtype=DTYPE)
    r2 = torch.cat([rewards[:, :gap_at], junk, rewards[:, gap_at:], junk.expand(2, pad)], 1)
    v2 = torch.cat([values[:, :gap_at], -junk, values[:, gap_at:], -junk.expand(2, pad)], 1)
    m2 = torch.cat([mask[:, :gap_at], torch.zeros(2, 1), mask[:, gap_at:], torch.zeros(2, pad)], 1)
    adv, ret = gae_advantages(r2, v2, m2, gamma=gamma, lam=lam)
    keep = m2.bool()
    torch.testing.assert_close(adv[keep].view(2, 5), base_adv)
    torch.testing.assert_close(ret[keep].view(2, 5), base_ret)
    assert (adv[~keep] == 0).all()


def test_discounted_returns_and_reinforce_pp():
    rewards = t(1.0, 0.0, 2.0, 5.0).unsqueeze(0)
    mask = torch.tensor([[1, 1, 1, 0]])
    ret = discounted_returns(rewards, mask, gamma=0.5)
    torch.testing.assert_close(ret, t(1 + 0.25 * 2, 0 + 0.5 * 2, 2, 0).unsqueeze(0))
    adv, ret2 = reinforce_pp_advantages(rewards, mask, gamma=0.5, eps=0.0)
    torch.testing.assert_close(ret2, ret)
    valid = adv[mask.bool()]
    assert valid.mean().abs() < 1e-12 and (valid.var(unbiased=False) - 1).abs() < 1e-12
    assert adv[0, 3] == 0


def test_spo_tracker_by_hand():
    tracker = SPOValueTracker(rho_min=0.875, rho_max=0.96, d_half=0.06)
    tracker.initialize("p", [1, 0, 1, 1])  # N0 = 8: alpha = 8 * 3.5 / 5, beta = 8 * 1.5 / 5
    assert tracker.alpha["p"] == pytest.approx(5.6) and tracker.beta["p"] == pytest.approx(2.4)
    assert tracker.values(["p", "new"]).tolist() == pytest.approx([0.7, 0.5])
    adv = tracker.advantages(["p", "new", "p"], t(1, 1, 0), normalize=False)
    torch.testing.assert_close(adv, t(0.3, 0.5, -0.7))
    # D = 0.06 -> rho = 2^-1 = 0.5, clipped to rho_min; no divergence -> rho_max.
    assert tracker.rho(0.06).item() == pytest.approx(0.875)
    assert tracker.rho(0.001).item() == pytest.approx(0.96)
    assert tracker.rho(0.01).item() == pytest.approx(2 ** (-0.01 / 0.06))
    tracker.update(["p", "new"], t(1, 0), divergence=t(0.01, 0.0))
    rho = 2 ** (-0.01 / 0.06)
    assert tracker.alpha["p"] == pytest.approx(rho * 5.6 + 1)
    assert tracker.beta["p"] == pytest.approx(rho * 2.4)
    assert tracker.alpha["new"] == pytest.approx(0.96 * 0.5) and tracker.beta["new"] == pytest.approx(
        0.96 * 0.5 + 1
    )
    w = tracker.sampling_weights(["p"], epsilon=0.05)
    v = tracker.values(["p"])
    torch.testing.assert_close(w, torch.sqrt(v * (1 - v)) + 0.05)


def test_spo_tracker_checkpoint_round_trip():
    a = SPOValueTracker(rho_min=0.8)
    a.initialize(0, [1, 1, 0])
    a.update([0, 1, 2], t(1, 0, 1), divergence=[0.02, 0.3, 0.0])
    b = SPOValueTracker()
    b.load_state_dict(a.state_dict())
    assert b.rho_min == 0.8 and len(b) == 3
    keys, rewards = [2, 0, 5], t(0, 1, 1)
    torch.testing.assert_close(b.advantages(keys, rewards), a.advantages(keys, rewards))
    a.update(keys, rewards, divergence=[0.1, 0.0, 0.05])
    b.update(keys, rewards, divergence=[0.1, 0.0, 0.05])
    assert a.state_dict() == b.state_dict()
    torch.save(a.state_dict(), "/dev/null")  # plain Python state, picklable


def test_spo_advantages_normalised_over_batch_and_divergence_helper():
    tracker = SPOValueTracker()
    adv = tracker.advantages(list("abcdef"), t(1, 0, 1, 1, 0, 1))
    assert adv.mean().abs() < 1e-12 and (adv.std() - 1).abs() < 1e-6
    new, old = t(-1.0, -2.0, -3.0).view(1, 3), t(-1.1, -2.0, 0.0).view(1, 3)
    torch.testing.assert_close(policy_divergence(new, old, torch.tensor([[1, 1, 0]])), t(0.05))


def test_dynamic_sampling_mask():
    rewards = t(1, 1, 1, 0, 0, 0, 0.5, 0.5, 1)
    keep = dynamic_sampling_mask(rewards, 3)
    assert keep.tolist() == [False] * 6 + [True] * 3
    assert dynamic_sampling_mask(t(1, float("nan"), 0, 0), 2).tolist() == [False, False, False, False]
    assert dynamic_sampling_mask(t(0.5, 0.51), 2, tol=0.05).tolist() == [False, False]


def test_pf_ppo_filter_and_weights():
    rewards = t(0.1, 0.9, 0.5, 0.3, 2.0, 1.0, 3.0, 0.0)
    assert pf_ppo_filter(rewards, 4, strategy="best_of_n").tolist() == [0, 1, 0, 0, 0, 0, 1, 0]
    assert pf_ppo_filter(rewards, 4, strategy="best_worst").tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    g = torch.Generator().manual_seed(0)
    br = pf_ppo_filter(rewards, 4, strategy="best_random", generator=g).view(2, 4)
    assert br.sum(1).tolist() == [2, 2] and br[0, 1] and br[1, 2]
    counts = torch.zeros(4)
    for seed in range(200):
        counts += pf_ppo_filter(
            t(0, 1, 0, 0), 4, strategy="best_random", generator=torch.Generator().manual_seed(seed)
        )
    assert counts[1] == 200 and (counts[[0, 2, 3]] > 40).all()  # the other pick is uniform over the rest
    torch.testing.assert_close(pf_ppo_weights(t(-2, 1, 0), weight_pow=2.0), t(4, 1, 0) + 1e-8)
    torch.testing.assert_close(pf_ppo_weights(t(-2, 1, 0), method="max_min"), t(1, 1, 0) + 1e-8)
    torch.testing.assert_close(pf_ppo_weights(t(-2, 1, 0), method="max_random"), t(0.1, 0.4, 0.1) + 1e-8)
    with pytest.raises(ValueError, match="best_worst"):
        pf_ppo_filter(rewards, 4, strategy="worst")
