"""Policy losses (values and gradients by hand), entropy, value loss, padding invariance."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms import (
    POLICY_LOSSES,
    compute_policy_loss,
    entropy_bonus,
    entropy_from_logits,
    ppo_clip_loss,
    value_loss,
)

from ._data import DTYPE, policy_batch


def t(*values):
    return torch.tensor(values, dtype=DTYPE)


def one_token_each(ratios, advantages):
    """[B, 1] inputs where token i has ratio ratios[i] (old log-prob 0)."""
    logps = torch.log(t(*ratios)).unsqueeze(1).requires_grad_(True)
    return logps, torch.zeros_like(logps), t(*advantages), torch.ones_like(logps)


def test_ppo_clip_values_and_gradients_by_hand():
    logps, old, adv, mask = one_token_each([1.5, 1.5, 0.5, 0.5, 1.1], [1.0, -1.0, 1.0, -1.0, 2.0])
    out = ppo_clip_loss(logps, old, adv, mask, clip_low=0.2)
    # r=1.5,A=1: clipped at 1.2; r=1.5,A=-1: unclipped 1.5; r=0.5,A=1: unclipped -0.5;
    # r=0.5,A=-1: clipped at 0.8; r=1.1,A=2: inside -> -2.2.
    torch.testing.assert_close(out.per_token_loss.squeeze(1), t(-1.2, 1.5, -0.5, 0.8, -2.2))
    (grad,) = torch.autograd.grad(out.per_token_loss.sum(), logps)
    # d(-A r)/d logp = -A r where unclipped, 0 where clipped.
    torch.testing.assert_close(grad.squeeze(1), t(0.0, 1.5, -0.5, 0.0, -2.2))
    assert out.metrics["clipfrac"].item() == pytest.approx(2 / 5)
    assert out.metrics["clipfrac_high"].item() == pytest.approx(1 / 5)
    assert out.metrics["clipfrac_low"].item() == pytest.approx(1 / 5)
    assert out.metrics["ratio_max"].item() == pytest.approx(1.5)


def test_clip_higher_is_asymmetric():
    logps, old, adv, mask = one_token_each([1.25, 0.75], [1.0, -1.0])
    symmetric = ppo_clip_loss(logps, old, adv, mask, clip_low=0.2).per_token_loss.squeeze(1)
    higher = ppo_clip_loss(logps, old, adv, mask, clip_low=0.2, clip_high=0.28).per_token_loss.squeeze(1)
    torch.testing.assert_close(symmetric, t(-1.2, 0.8))
    torch.testing.assert_close(higher, t(-1.25, 0.8))  # only the upper bound moved


def test_dual_clip_bounds_negative_advantage_loss():
    logps, old, adv, mask = one_token_each([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0])
    plain = ppo_clip_loss(logps, old, adv, mask, clip_low=0.2)
    dual = ppo_clip_loss(logps, old, adv, mask, clip_low=0.2, dual_clip=3.0)
    torch.testing.assert_close(plain.per_token_loss.squeeze(1), t(5.0, 2.0, -1.2))
    torch.testing.assert_close(dual.per_token_loss.squeeze(1), t(3.0, 2.0, -1.2))
    (grad,) = torch.autograd.grad(dual.per_token_loss.sum(), logps)
    torch.testing.assert_close(grad.squeeze(1), t(0.0, 2.0, 0.0))  # bounded token: no gradient
    assert dual.metrics["dual_clipfrac"].item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(logps, old, adv, mask, dual_clip=0.5)


def test_gspo_sequence_ratio_value_and_stop_gradient():
    p = policy_batch(31, batch=3, width=4, spread=0.01)
    m = p.mask.bool()
    logps = p.logprobs.clone().requires_grad_(True)
    out = compute_policy_loss(
        "gspo", logps, p.old_logprobs, p.advantages, p.mask, clip_low=0.5, clip_high=0.5
    )
    seq_ratio = torch.exp(torch.where(m, p.logprobs - p.old_logprobs, 0.0).sum(-1) / m.sum(-1))
    expected = torch.where(m, -p.advantages.unsqueeze(1) * seq_ratio.unsqueeze(1), 0.0)
    torch.testing.assert_close(out.per_token_loss, expected)
    # Token-level form: the loss at token t depends on log pi_t only (the sequence ratio is detached),
    # with d l_t / d logp_t = -A s.
    jac = torch.autograd.functional.jacobian(
        lambda lp: (
            compute_policy_loss(
                "gspo", lp, p.old_logprobs, p.advantages, p.mask, clip_low=0.5, clip_high=0.5
            ).per_token_loss
        ),
        p.logprobs,
    )
    for i in range(3):
        for tt in range(4):
            row = jac[i, tt].clone()
            diag = row[i, tt].item()
            row[i, tt] = 0
            assert (row == 0).all()
            want = -p.advantages[i].item() * seq_ratio[i].item() if m[i, tt] else 0.0
            assert diag == pytest.approx(want, abs=1e-12)
    # Aggregated with seq-mean-token-mean, the gradient equals that of exp(mean log-ratio) without
    # stop-gradient (GSPO's objective).
    agg = compute_policy_loss(
        "gspo",
        logps,
        p.old_logprobs,
        p.advantages,
        p.mask,
        loss_agg_mode="seq-mean-token-mean",
        clip_low=0.5,
        clip_high=0.5,
    ).loss
    (g,) = torch.autograd.grad(agg, logps)
    direct = p.logprobs.clone().requires_grad_(True)
    s = torch.exp(torch.where(m, direct - p.old_logprobs, 0.0).sum(-1) / m.sum(-1))
    (g_direct,) = torch.autograd.grad((-p.advantages * s).mean(), direct)
    torch.testing.assert_close(g, g_direct)


def test_cispo_weight_is_clipped_and_detached():
    logps, old, adv, mask = one_token_each([3.0, 0.5, 1.2], [1.0, -1.0, 2.0])
    out = compute_policy_loss(
        "cispo", logps, old, adv, mask, clip_high=1.0, loss_agg_mode="seq-mean-token-sum"
    )
    weights = t(2.0, 0.5, 1.2)  # ratio clipped at 1 + 1.0 = 2; no lower bound by default
    torch.testing.assert_close(out.per_token_loss.squeeze(1), -weights * adv * logps.detach().squeeze(1))
    (grad,) = torch.autograd.grad(out.loss, logps)
    # Only log pi carries gradient: -w A / B, even for the clipped token.
    torch.testing.assert_close(grad.squeeze(1), -weights * adv / 3)
    assert out.metrics["clipfrac"].item() == pytest.approx(1 / 3)
    low = compute_policy_loss("cispo", logps, old, adv, mask, clip_low=0.2, clip_high=1.0)
    assert low.per_token_loss[1, 0].item() == pytest.approx(-0.8 * -1.0 * math.log(0.5))


def _covariance(p):
    m = p.mask.bool()
    adv = p.advantages.unsqueeze(1).expand_as(p.logprobs)
    a_mean = adv[m].mean()
    l_mean = p.logprobs[m].mean()
    return torch.where(m, (adv - a_mean) * (p.logprobs - l_mean), torch.full_like(adv, -math.inf))


def test_kl_cov_penalises_top_covariance_tokens():
    p = policy_batch(32, batch=4, width=6, spread=0.1)
    logps = p.logprobs.clone().requires_grad_(True)
    out = compute_policy_loss(
        "kl_cov", logps, p.old_logprobs, p.advantages, p.mask, kl_cov_ratio=0.2, ppo_kl_coef=0.5
    )
    m = p.mask.bool()
    n = int(m.sum())
    k = max(1, int(n * 0.2))
    top = torch.topk(_covariance(p).flatten(), k).indices
    selected = torch.zeros(p.mask.numel(), dtype=torch.bool)
    selected[top] = True
    selected = selected.view_as(m)
    ratio = torch.exp(p.logprobs - p.old_logprobs)
    base = -p.advantages.unsqueeze(1) * ratio
    expected = torch.where(selected, base + 0.5 * (p.logprobs - p.old_logprobs).abs(), base)
    torch.testing.assert_close(out.per_token_loss, torch.where(m, expected, 0.0))
    assert out.metrics["kl_cov_frac"].item() == pytest.approx(k / n)


def test_clip_cov_detaches_a_random_subset_of_high_covariance_tokens():
    p = policy_batch(33, batch=4, width=8, spread=0.02)
    p.advantages = p.advantages * 20  # large covariances
    m = p.mask.bool()
    cov = _covariance(p)
    candidates = m & (cov > 1.0) & (cov < 5.0)
    assert candidates.sum() >= 3
    logps = p.logprobs.clone().requires_grad_(True)
    kwargs = dict(clip_low=0.5, clip_cov_ratio=2.5 / int(m.sum()), clip_cov_lb=1.0, clip_cov_ub=5.0)
    out = compute_policy_loss(
        "clip_cov",
        logps,
        p.old_logprobs,
        p.advantages,
        p.mask,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    ref = compute_policy_loss("ppo", logps, p.old_logprobs, p.advantages, p.mask, clip_low=0.5)
    torch.testing.assert_close(out.per_token_loss, ref.per_token_loss)  # same values
    (g,) = torch.autograd.grad(out.per_token_loss.sum(), logps)
    (g_ref,) = torch.autograd.grad(ref.per_token_loss.sum(), logps)
    detached = (g == 0) & (g_ref != 0)
    assert int(detached.sum()) == 2 and (detached <= candidates).all()
    torch.testing.assert_close(g[~detached], g_ref[~detached])
    again = compute_policy_loss(
        "clip_cov",
        logps,
        p.old_logprobs,
        p.advantages,
        p.mask,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    (g2,) = torch.autograd.grad(again.per_token_loss.sum(), logps)
    torch.testing.assert_close(g2, g)  # reproducible with a seeded generator


def test_value_loss_by_hand():
    v = t(1.0, 0.1).view(1, 2).requires_grad_(True)
    old, ret, mask = t(0.0, 0.0).view(1, 2), t(2.0, 0.0).view(1, 2), torch.ones(1, 2)
    loss, metrics = value_loss(v, old, ret, mask, clip_range=0.2)
    # Token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24. Token 1: both 0.01.
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert metrics["vf_clipfrac"].item() == pytest.approx(0.5)
    (g,) = torch.autograd.grad(loss, v)
    torch.testing.assert_close(g, t(0.0, 0.5 * 2 * 0.1 / 2).view(1, 2))  # clipped branch: no gradient
    plain, _ = value_loss(v, old, ret, mask, clip_range=None)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 0.01) / 2)


def test_entropy_and_bonus():
    logits = torch.randn(2, 3, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    h = entropy_from_logits(logits)
    torch.testing.assert_close(h, torch.distributions.Categorical(logits=logits).entropy())
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    bonus = entropy_bonus(h, mask, coef=0.01)
    assert bonus.item() == pytest.approx(-0.01 * (h[0, 0] + h[0, 1] + h[1, 0]).item() / 3)


def test_importance_weights_and_errors():
    p = policy_batch(34)
    w = torch.rand(p.mask.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    plain = compute_policy_loss("ppo", p.logprobs, p.old_logprobs, p.advantages, p.mask)
    weighted = compute_policy_loss(
        "ppo", p.logprobs, p.old_logprobs, p.advantages, p.mask, importance_weights=w
    )
    torch.testing.assert_close(weighted.per_token_loss, plain.per_token_loss * w.detach())
    assert not weighted.per_token_loss.requires_grad
    with pytest.raises(ValueError, match="Did you mean 'cispo'"):
        compute_policy_loss("cipso", p.logprobs, p.old_logprobs, p.advantages, p.mask)
    with pytest.raises(ValueError, match="shape"):
        compute_policy_loss("ppo", p.logprobs, p.old_logprobs[:, :3], p.advantages, p.mask)


OPTIONS = {
    "ppo": {"clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0},
    "gspo": {},
    "cispo": {},
    "clip_cov": {"clip_cov_ratio": 0.1, "clip_cov_lb": -10.0, "clip_cov_ub": 10.0},
    "kl_cov": {"kl_cov_ratio": 0.1},
    "oreal": {"clip_low": 0.2, "clip_high": 0.28},
}
MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def test_every_registered_policy_loss_is_covered():
    assert set(OPTIONS) == set(POLICY_LOSSES)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    pad=st.integers(1, 4),
    name=st.sampled_from(sorted(OPTIONS)),
    mode=st.sampled_from(MODES),
    token_advantages=st.booleans(),
)
def test_padding_does_not_change_loss_or_gradients(seed, pad, name, mode, token_advantages):
    p = policy_batch(seed, batch=3, width=5)
    adv = (
        p.advantages.unsqueeze(1).expand(3, 5) * (1 + 0.1 * torch.arange(5))
        if token_advantages
        else p.advantages
    )

    def run(lp, old, mask, a):
        x = lp.clone().requires_grad_(True)
        opts = dict(OPTIONS[name])
        if name == "clip_cov":
            opts["generator"] = torch.Generator().manual_seed(seed)
        out = compute_policy_loss(name, x, old, a, mask, loss_agg_mode=mode, norm_constant=7.0, **opts)
        (g,) = torch.autograd.grad(out.loss, x)
        return out, g

    base, g_base = run(p.logprobs, p.old_logprobs, p.mask, adv)
    junk = torch.full((3, pad), 55.0, dtype=DTYPE)
    padded_adv = torch.cat([adv, -junk], 1) if token_advantages else adv
    padded, g_pad = run(
        torch.cat([p.logprobs, junk], 1),
        torch.cat([p.old_logprobs, -junk], 1),
        torch.cat([p.mask, torch.zeros(3, pad, dtype=p.mask.dtype)], 1),
        padded_adv,
    )
    assert base.loss.shape == () and base.per_token_loss.shape == (3, 5)
    assert torch.isfinite(padded.loss)
    torch.testing.assert_close(padded.loss, base.loss)
    torch.testing.assert_close(g_pad[:, :5], g_base)
    assert (g_pad[:, 5:] == 0).all() and (padded.per_token_loss[:, 5:] == 0).all()
    for key, value in base.metrics.items():
        torch.testing.assert_close(padded.metrics[key], value, msg=key)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), name=st.sampled_from(["ppo", "gspo", "cispo"]))
def test_on_policy_gradient_is_the_policy_gradient(seed, name):
    """At old = current (first PPO epoch), the clipped losses' gradient is -A * grad log pi (token-mean)."""
    p = policy_batch(seed, batch=3, width=4)
    lp = p.logprobs.clone().requires_grad_(True)
    out = compute_policy_loss(name, lp, p.logprobs.detach(), p.advantages, p.mask)
    (g,) = torch.autograd.grad(out.loss, lp)
    m = p.mask.bool()
    expected = torch.where(m, -p.advantages.unsqueeze(1).expand_as(lp) / m.sum(), 0.0)
    torch.testing.assert_close(g, expected)
