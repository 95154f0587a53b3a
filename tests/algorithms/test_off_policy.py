"""Truncated importance sampling between sampler and learner log-probs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms import compute_policy_loss, truncated_importance_weights

from ._data import DTYPE, policy_batch

LEARNER = torch.log(torch.tensor([[1.0, 3.0, 0.5], [2.0, 1.0, 7.0]], dtype=DTYPE)) - 5
SAMPLER = torch.full((2, 3), -5.0, dtype=DTYPE)  # ratios are [[1, 3, 0.5], [2, 1, 7]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_token_level_by_hand():
    out = truncated_importance_weights(LEARNER, SAMPLER, MASK, clip_max=2.0)
    torch.testing.assert_close(out.weights, torch.tensor([[1.0, 2.0, 0.5], [2.0, 1.0, 0.0]], dtype=DTYPE))
    m = out.metrics
    assert m["mean_ratio"].item() == pytest.approx((1 + 3 + 0.5 + 2 + 1) / 5)
    assert m["max_ratio"].item() == pytest.approx(3.0)
    assert m["min_ratio"].item() == pytest.approx(0.5)
    assert m["clipped_frac"].item() == pytest.approx(1 / 5)
    assert m["mean_weight"].item() == pytest.approx((1 + 2 + 0.5 + 2 + 1) / 5)
    w = torch.tensor([1, 2, 0.5, 2, 1], dtype=DTYPE)
    assert m["ess"].item() == pytest.approx((w.sum() ** 2 / (5 * (w**2).sum())).item())
    logr = torch.log(torch.tensor([1, 3, 0.5, 2, 1], dtype=DTYPE))
    assert m["kl_k1"].item() == pytest.approx(-logr.mean().item())
    assert m["kl_k3"].item() == pytest.approx((logr.exp() - 1 - logr).mean().item())
    low = truncated_importance_weights(LEARNER, SAMPLER, MASK, clip_max=2.0, clip_min=0.8)
    assert low.weights[0, 2].item() == pytest.approx(0.8) and low.metrics[
        "clipped_frac"
    ].item() == pytest.approx(2 / 5)
    masked = truncated_importance_weights(LEARNER, SAMPLER, MASK, clip_max=2.0, clip_min=0.8, mode="mask")
    torch.testing.assert_close(masked.weights, torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0]], dtype=DTYPE))


def test_sequence_levels_by_hand():
    seq = truncated_importance_weights(LEARNER, SAMPLER, MASK, level="sequence", clip_max=2.5)
    torch.testing.assert_close(seq.weights, torch.tensor([[1.5], [2.0]], dtype=DTYPE))  # products 1.5 and 2
    geo = truncated_importance_weights(LEARNER, SAMPLER, MASK, level="geometric", clip_max=1.2)
    torch.testing.assert_close(geo.weights, torch.tensor([[1.5 ** (1 / 3)], [1.2]], dtype=DTYPE))
    assert geo.metrics["clipped_frac"].item() == pytest.approx(0.5)
    assert geo.metrics["max_ratio"].item() == pytest.approx(math.sqrt(2))


def test_nan_sampler_logprobs_and_detach():
    sampler = SAMPLER.clone()
    sampler[0, 1] = float("nan")
    learner = LEARNER.clone().requires_grad_(True)
    out = truncated_importance_weights(learner, sampler, MASK, clip_max=10.0)
    assert out.weights[0, 1].item() == 1.0 and torch.isfinite(out.weights).all()
    assert not out.weights.requires_grad
    with pytest.raises(ValueError, match="level"):
        truncated_importance_weights(LEARNER, SAMPLER, MASK, level="block")
    with pytest.raises(ValueError, match="mode"):
        truncated_importance_weights(LEARNER, SAMPLER, MASK, mode="clip")


def test_weights_plug_into_policy_loss():
    p = policy_batch(41)
    w = truncated_importance_weights(p.old_logprobs, p.ref_logprobs, p.mask, level="sequence", clip_max=2.0)
    plain = compute_policy_loss(
        "ppo", p.logprobs, p.old_logprobs, p.advantages, p.mask, loss_agg_mode="seq-mean-token-mean"
    )
    corrected = compute_policy_loss(
        "ppo",
        p.logprobs,
        p.old_logprobs,
        p.advantages,
        p.mask,
        loss_agg_mode="seq-mean-token-mean",
        importance_weights=w.weights,
    )
    torch.testing.assert_close(corrected.per_token_loss, plain.per_token_loss * w.weights)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    pad=st.integers(1, 3),
    level=st.sampled_from(["token", "sequence", "geometric"]),
)
def test_padding_invariance(seed, pad, level):
    p = policy_batch(seed, batch=3, width=4)
    base = truncated_importance_weights(
        p.old_logprobs, p.ref_logprobs, p.mask, level=level, clip_max=1.5, clip_min=0.7
    )
    junk = torch.full((3, pad), 80.0, dtype=DTYPE)
    padded = truncated_importance_weights(
        torch.cat([p.old_logprobs, junk], 1),
        torch.cat([p.ref_logprobs, -junk], 1),
        torch.cat([p.mask, torch.zeros(3, pad, dtype=p.mask.dtype)], 1),
        level=level,
        clip_max=1.5,
        clip_min=0.7,
    )
    if level == "token":
        torch.testing.assert_close(padded.weights[:, :4], base.weights)
        assert (padded.weights[:, 4:] == 0).all()
    else:
        torch.testing.assert_close(padded.weights, base.weights)
    for key, value in base.metrics.items():
        torch.testing.assert_close(padded.metrics[key], value, msg=key)
    assert ((base.weights <= 1.5) & (base.weights >= 0)).all()
