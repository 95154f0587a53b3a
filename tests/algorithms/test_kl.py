"""KL estimators (values, exact expectations, gradients), KL in reward / loss, controllers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_loss,
    kl_penalized_rewards,
    make_kl_controller,
    sequence_kl,
)

from ._data import DTYPE


def t(*values):
    return torch.tensor(values, dtype=DTYPE)


def test_estimators_by_hand():
    lp, ref = t(-1.0), t(-2.0)
    assert kl_estimate("k1", lp, ref).item() == pytest.approx(1.0)
    assert kl_estimate("k2", lp, ref).item() == pytest.approx(0.5)
    assert kl_estimate("k3", lp, ref).item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert kl_estimate("low_var_kl", lp, ref).item() == pytest.approx(math.exp(-1))
    assert kl_estimate("low_var_kl", t(-30.0), t(-1.0)).item() == 10.0  # clamped
    assert kl_estimate("k3+", lp, ref).item() == pytest.approx(math.exp(-1))
    with pytest.raises(ValueError, match="Did you mean 'k3'"):
        kl_estimate("k4", lp, ref)


def test_exact_expectations_over_a_small_vocabulary():
    """Under y ~ p, E[k1] = E[k3] = KL(p || q) exactly (unbiased); E[k2] is not."""
    p = torch.softmax(t(0.3, -1.0, 2.0, 0.5), 0)
    q = torch.softmax(t(-0.2, 0.4, 1.0, 0.0), 0)
    kl = (p * (p.log() - q.log())).sum()
    for kind in ("k1", "k3"):
        expectation = (p * kl_estimate(kind, p.log(), q.log())).sum()
        assert expectation.item() == pytest.approx(kl.item(), abs=1e-12), kind
    assert abs((p * kl_estimate("k2", p.log(), q.log())).sum().item() - kl.item()) > 1e-3


def test_gradients():
    lp = t(-1.0, -0.5, -3.0).requires_grad_(True)
    ref = t(-2.0, -0.5, -1.0)
    (g3,) = torch.autograd.grad(kl_estimate("k3", lp, ref).sum(), lp)
    torch.testing.assert_close(g3, 1 - torch.exp(ref - lp.detach()))  # d/dlogp [e^(ref-lp) - (ref-lp) - 1]
    (g2,) = torch.autograd.grad(kl_estimate("k2", lp, ref).sum(), lp)
    torch.testing.assert_close(g2, lp.detach() - ref)
    (g1,) = torch.autograd.grad(kl_estimate("k1", lp, ref).sum(), lp)
    torch.testing.assert_close(g1, torch.ones(3, dtype=DTYPE))
    # Straight-through: value of k3 / k1, gradient of k2.
    for kind, base in (("k3+", "k3"), ("k1+", "k1")):
        value = kl_estimate(kind, lp, ref)
        torch.testing.assert_close(value, kl_estimate(base, lp, ref))
        (g,) = torch.autograd.grad(value.sum(), lp)
        torch.testing.assert_close(g, g2)
    # The reference is a constant in practice, but the estimators stay differentiable in it too.
    ref_g = ref.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(kl_estimate("k3", lp.detach(), ref_g).sum(), ref_g)
    torch.testing.assert_close(gr, torch.exp(ref - lp.detach()) - 1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-8, 0), min_size=2, max_size=2), st.sampled_from(sorted(KL_ESTIMATORS)))
def test_non_negative_estimators(values, kind):
    lp, ref = t(values[0]), t(values[1])
    value = kl_estimate(kind, lp, ref).item()
    if kind in ("k2", "k3", "low_var_kl", "k3+"):
        assert value >= 0
    if values[0] == values[1]:
        assert value == 0


def test_kl_in_reward():
    lp = t(-1.0, -1.0, -1.0, 9.0).view(1, 4)
    ref = t(-1.5, -0.5, -1.0, 0.0).view(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards = kl_penalized_rewards(t(2.0), lp, ref, mask, coef=0.1)
    torch.testing.assert_close(rewards, t(-0.05, 0.05, 2.0, 0.0).view(1, 4))
    token_level = kl_penalized_rewards(t(1.0, 0.0, 0.0, 5.0).view(1, 4), lp, ref, mask, coef=0.1, kind="k2")
    torch.testing.assert_close(token_level, t(1 - 0.1 * 0.125, -0.1 * 0.125, 0.0, 0.0).view(1, 4))
    grad_lp = lp.clone().requires_grad_(True)
    assert not kl_penalized_rewards(t(2.0), grad_lp, ref, mask, coef=0.1).requires_grad
    # A gap in the mask (tool output) keeps the outcome reward on the last real token.
    gap = kl_penalized_rewards(t(2.0), lp, ref, torch.tensor([[1, 1, 0, 1]]), coef=0.0)
    torch.testing.assert_close(gap, t(0.0, 0.0, 0.0, 2.0).view(1, 4))
    empty = kl_penalized_rewards(t(2.0), lp, ref, torch.zeros(1, 4), coef=0.1)
    assert (empty == 0).all()
    with pytest.raises(ValueError, match="rewards"):
        kl_penalized_rewards(t(1.0, 2.0), lp, ref, mask, coef=0.1)


def test_kl_loss_and_sequence_kl():
    lp = t(-1.0, -2.0, 5.0).view(1, 3)
    ref = t(-2.0, -2.0, 0.0).view(1, 3)
    mask = torch.tensor([[1, 1, 0]])
    expected = (math.exp(-1) + 0.0) / 2
    assert kl_loss(lp, ref, mask, kind="k3").item() == pytest.approx(expected)
    assert sequence_kl("k1", lp, ref, mask).item() == pytest.approx(1.0)


def test_adaptive_controller_by_hand_and_checkpoint():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert ctl.update(9.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))  # error clipped to +0.2
    assert ctl.update(5.7, 100) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000) * (1 - 0.05 * 100 / 10_000))
    clone = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    clone.load_state_dict(ctl.state_dict())
    assert clone.update(1.0, 10) == ctl.update(1.0, 10)
    assert clone.state_dict() == ctl.state_dict()
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 10) == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05
    assert isinstance(make_kl_controller("adaptive", coef=0.1, target=6, horizon=100), AdaptiveKLController)
    assert isinstance(make_kl_controller("fixed", coef=0.1), FixedKLController)
    with pytest.raises(ValueError, match="target"):
        make_kl_controller("adaptive", coef=0.1)
    with pytest.raises(ValueError, match="fixed"):
        make_kl_controller("pid", coef=0.1)
    with pytest.raises(ValueError, match="positive"):
        AdaptiveKLController(0.1, target=0.0, horizon=1)
