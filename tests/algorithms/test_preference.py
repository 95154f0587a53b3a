"""Preference losses: hand-computed values, gradients, options and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms import (
    PREFERENCE_LOSSES,
    UnknownNameError,
    kto_kl_reference,
    kto_loss,
    orpo_log_odds_ratio,
    preference_loss,
    preference_rewards,
)
from posttrain.errors import ConfigError

from ._data import DTYPE, preference_batch


def t(*values):
    return torch.tensor(values, dtype=DTYPE)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# One example: log-ratios +0.5 (chosen) and -0.5 (rejected), so Delta = 1.
C, R, RC, RR = t(-1.0), t(-2.0), t(-1.5), t(-1.5)


def test_dpo_sigmoid_by_hand():
    assert preference_loss("sigmoid", C, R, RC, RR, beta=0.5).item() == pytest.approx(
        softplus(-0.5), abs=1e-12
    )


def test_conservative_dpo_by_hand():
    expected = 0.9 * softplus(-0.5) + 0.1 * softplus(0.5)
    assert preference_loss("sigmoid", C, R, RC, RR, beta=0.5, label_smoothing=0.1).item() == pytest.approx(
        expected
    )
    assert preference_loss("cdpo", C, R, RC, RR, beta=0.5, label_smoothing=0.1).item() == pytest.approx(
        expected
    )


def test_hinge_ipo_robust_by_hand():
    assert preference_loss("hinge", C, R, RC, RR, beta=0.5).item() == pytest.approx(0.5)
    assert preference_loss("hinge", C, R, RC, RR, beta=2.0).item() == 0.0
    # IPO on per-token log-ratios: lengths 2 and 4 -> 0.25 - (-0.125) = 0.375; target 1/(2*0.5) = 1.
    ipo = preference_loss("ipo", C, R, RC, RR, beta=0.5, chosen_lengths=t(2), rejected_lengths=t(4))
    assert ipo.item() == pytest.approx((0.375 - 1.0) ** 2)
    robust = preference_loss("robust", C, R, RC, RR, beta=1.0, label_smoothing=0.2)
    assert robust.item() == pytest.approx((0.8 * softplus(-1.0) - 0.2 * softplus(1.0)) / 0.6)


def test_other_dpo_variants_by_hand():
    beta = 0.5
    rc, rr = beta * 0.5, beta * -0.5
    z = beta * 1.0
    cases = {
        "nca_pair": softplus(-rc) + 0.5 * softplus(rc) + 0.5 * softplus(rr),
        "bco_pair": softplus(-rc) + softplus(rr),
        "sppo_hard": (0.5 - 1.0) ** 2 + (-0.5 + 1.0) ** 2,
        "apo_zero": 1 - sigmoid(rc) + sigmoid(rr),
        "apo_down": sigmoid(rc) + 1 - sigmoid(rc - rr),
        "discopop": softplus(-z) * (1 - sigmoid(z / 0.05)) + math.exp(-z) * sigmoid(z / 0.05),
        "exo_pair": sigmoid(z) * (math.log(sigmoid(z)) - math.log(1 - 1e-3))
        + sigmoid(-z) * (math.log(sigmoid(-z)) - math.log(1e-3)),
    }
    for name, expected in cases.items():
        ls = 1e-3 if name == "exo_pair" else 0.0
        got = preference_loss(name, C, R, RC, RR, beta=beta, label_smoothing=ls).item()
        assert got == pytest.approx(expected, abs=1e-12), name


def test_reference_free_losses_by_hand():
    # SimPO: average log-probs -0.5 and -1.0, beta 2, gamma 0.4 -> -log sigma(2 * 0.5 - 0.4).
    simpo = preference_loss(
        "simpo", C, R, beta=2.0, simpo_gamma=0.4, chosen_lengths=t(2), rejected_lengths=t(2)
    )
    assert simpo.item() == pytest.approx(softplus(-0.6))
    # ORPO: odds(p) = p / (1 - p), p = exp(avg logp); NLL = -avg chosen logp.
    pc, pr = math.exp(-0.5), math.exp(-1.0)
    log_or = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
    orpo = preference_loss("orpo", C, R, beta=0.1, chosen_lengths=t(2), rejected_lengths=t(2))
    assert orpo.item() == pytest.approx(0.5 + 0.1 * softplus(-log_or))
    assert orpo_log_odds_ratio(t(-0.5), t(-1.0)).item() == pytest.approx(log_or)
    cpo = preference_loss("cpo", C, R, beta=0.1, cpo_alpha=0.5, chosen_lengths=t(2))
    assert cpo.item() == pytest.approx(softplus(-0.1) + 0.5 * 0.5)


def test_rpo_is_dpo_plus_length_normalised_nll():
    rpo = preference_loss("rpo", C, R, RC, RR, beta=0.5, rpo_alpha=0.3, chosen_lengths=t(4))
    assert rpo.item() == pytest.approx(softplus(-0.5) + 0.3 * 0.25)
    combo = preference_loss(
        ["sigmoid", "sft"], C, R, RC, RR, beta=0.5, loss_weights=[1.0, 0.3], chosen_lengths=t(4)
    )
    torch.testing.assert_close(combo, rpo)
    # Lengths are batch data: losses that do not need them accept and ignore them.
    torch.testing.assert_close(
        preference_loss("sigmoid", C, R, RC, RR, beta=0.5, chosen_lengths=t(4), rejected_lengths=t(9)),
        preference_loss("sigmoid", C, R, RC, RR, beta=0.5),
    )


def test_modpo_by_hand():
    # w = (0.5, 0.5): logits = (beta * Delta - 0.5 * (r1(c) - r1(r))) / 0.5.
    loss = preference_loss(
        "modpo",
        C,
        R,
        RC,
        RR,
        beta=0.5,
        modpo_weights=[0.5, 0.5],
        margin_rewards_chosen=t(0.8),
        margin_rewards_rejected=t(0.2),
    )
    assert loss.item() == pytest.approx(softplus(-(0.5 - 0.3) / 0.5))
    with pytest.raises(ValueError, match="margin rewards"):
        preference_loss(
            "modpo",
            C,
            R,
            RC,
            RR,
            modpo_weights=[0.5, 0.3, 0.2],
            margin_rewards_chosen=t(0.8),
            margin_rewards_rejected=t(0.2),
        )


def test_kto_by_hand_and_reference_point():
    logps, ref = t(-1.0, -2.0), t(-1.5, -1.0)  # log-ratios +0.5 (desirable), -1.0 (undesirable)
    labels = torch.tensor([True, False])
    loss = kto_loss(logps, ref, labels, beta=0.4, kl=0.2, desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(loss, t(2.0 * (1 - sigmoid(0.4 * 0.3)), 0.5 * (1 - sigmoid(0.4 * 1.2))))
    # z0 = max(0, mean KL) and carries no gradient.
    kl_logps = t(-1.0, -3.0).requires_grad_(True)
    assert kto_kl_reference(kl_logps, t(-2.0, -1.0)).item() == 0.0
    z0 = kto_kl_reference(kl_logps, t(-2.0, -3.5))
    assert z0.item() == pytest.approx(0.75) and not z0.requires_grad
    unpaired = kto_loss(logps, ref, labels, beta=0.4, loss_type="apo_zero_unpaired")
    torch.testing.assert_close(unpaired, t(1 - sigmoid(0.2), sigmoid(-0.4)))
    with pytest.raises(ValueError, match="reference point"):
        kto_loss(logps, ref, labels)


def test_kto_paired_mean_equals_unpaired_mean():
    b = preference_batch(21)
    paired = preference_loss("kto", b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, beta=0.2, kl=0.1)
    unpaired = kto_loss(
        torch.cat([b.chosen, b.rejected]),
        torch.cat([b.ref_chosen, b.ref_rejected]),
        torch.tensor([True] * 4 + [False] * 4),
        beta=0.2,
        kl=0.1,
    )
    assert paired.shape == (4,)
    torch.testing.assert_close(paired.mean(), unpaired.mean())


def test_dpo_gradient_by_hand():
    chosen = C.clone().requires_grad_(True)
    rejected = R.clone().requires_grad_(True)
    preference_loss("sigmoid", chosen, rejected, RC, RR, beta=0.5).sum().backward()
    # d/d logp_c [-log sigma(beta Delta)] = -beta sigma(-beta Delta); opposite for the rejected.
    assert chosen.grad.item() == pytest.approx(-0.5 * sigmoid(-0.5))
    assert rejected.grad.item() == pytest.approx(0.5 * sigmoid(-0.5))


def test_preference_rewards():
    rewards = preference_rewards(t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -2.0), beta=0.5)
    torch.testing.assert_close(rewards.chosen, t(0.25, -0.5))
    torch.testing.assert_close(rewards.rejected, t(-0.25, 0.5))
    torch.testing.assert_close(rewards.margins, t(0.5, -1.0))
    torch.testing.assert_close(rewards.accuracies, t(1.0, 0.0))
    free = preference_rewards(t(-2.0), t(-3.0), beta=2.0, chosen_lengths=t(4), rejected_lengths=t(2))
    torch.testing.assert_close(free.chosen, t(-1.0))
    torch.testing.assert_close(free.rejected, t(-3.0))
    grad_in = t(-1.0).requires_grad_(True)
    assert not preference_rewards(grad_in, t(-2.0), beta=1.0).chosen.requires_grad
    with pytest.raises(ValueError, match="both"):
        preference_rewards(C, R, RC, None)


def test_errors_name_valid_options():
    with pytest.raises(ValueError, match="Did you mean 'sigmoid'") as info:
        preference_loss("sigmod", C, R, RC, RR)
    assert "simpo" in str(info.value) and isinstance(info.value, UnknownNameError)
    assert isinstance(info.value, ConfigError)
    with pytest.raises(TypeError, match="gama"):
        preference_loss("simpo", C, R, gama=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("hinge", C, R, RC, RR, label_smoothing=0.1)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss("sigmoid", C, R)
    with pytest.raises(ValueError, match="exo_pair"):
        preference_loss("exo_pair", C, R, RC, RR, label_smoothing=0.0)
    with pytest.raises(ValueError, match="loss_weights"):
        preference_loss(["sigmoid", "sft"], C, R, RC, RR, loss_weights=[1.0])


PAIRED_WITH_REF = [
    "sigmoid",
    "hinge",
    "ipo",
    "sigmoid_norm",
    "robust",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "rpo",
    "kto",
]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shift_c=st.floats(-5, 5),
    shift_r=st.floats(-5, 5),
    name=st.sampled_from(PAIRED_WITH_REF),
)
def test_reference_losses_depend_only_on_log_ratios(seed, shift_c, shift_r, name):
    """Adding a constant to both a response's policy and reference log-prob leaves the loss unchanged
    (for losses whose only use of the policy log-prob is the log-ratio)."""
    b = preference_batch(seed)
    extra = {"kl": 0.1} if name == "kto" else {}
    if name == "rpo":
        extra = {"chosen_nll": t(0.3, 0.1, 0.2, 0.4)}
    base = preference_loss(name, b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, beta=0.3, **extra)
    moved = preference_loss(
        name,
        b.chosen + shift_c,
        b.rejected + shift_r,
        b.ref_chosen + shift_c,
        b.ref_rejected + shift_r,
        beta=0.3,
        **extra,
    )
    assert base.shape == (4,)
    torch.testing.assert_close(moved, base, atol=1e-9, rtol=1e-9)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), repeat=st.integers(1, 4))
def test_length_normalised_losses_invariant_to_repeating_tokens(seed, repeat):
    """SimPO, ORPO, IPO and sigmoid_norm see per-token averages: scaling both the summed log-probs and
    the lengths by the same factor changes nothing."""
    b = preference_batch(seed)
    for name in ("simpo", "orpo", "ipo", "sigmoid_norm"):
        one = preference_loss(
            name,
            b.chosen,
            b.rejected,
            b.ref_chosen,
            b.ref_rejected,
            beta=0.5,
            chosen_lengths=b.chosen_lengths,
            rejected_lengths=b.rejected_lengths,
        )
        many = preference_loss(
            name,
            b.chosen * repeat,
            b.rejected * repeat,
            b.ref_chosen * repeat,
            b.ref_rejected * repeat,
            beta=0.5,
            chosen_lengths=b.chosen_lengths * repeat,
            rejected_lengths=b.rejected_lengths * repeat,
        )
        torch.testing.assert_close(many, one, atol=1e-9, rtol=1e-9)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_per_example_losses_are_independent(seed):
    """Every loss but AOT's order statistics is per example: computing on a sub-batch gives the same rows."""
    b = preference_batch(seed, batch=5)
    for name in sorted(set(PREFERENCE_LOSSES) - {"aot", "aot_unpaired", "modpo"}):
        ls = 1e-3 if name == "exo_pair" else 0.0
        extra = {"kl": 0.05} if name == "kto" else {}
        full = preference_loss(
            name,
            b.chosen,
            b.rejected,
            b.ref_chosen,
            b.ref_rejected,
            beta=0.4,
            label_smoothing=ls,
            chosen_lengths=b.chosen_lengths,
            rejected_lengths=b.rejected_lengths,
            **extra,
        )
        part = preference_loss(
            name,
            b.chosen[1:3],
            b.rejected[1:3],
            b.ref_chosen[1:3],
            b.ref_rejected[1:3],
            beta=0.4,
            label_smoothing=ls,
            chosen_lengths=b.chosen_lengths[1:3],
            rejected_lengths=b.rejected_lengths[1:3],
            **extra,
        )
        assert full.shape == (5,), name
        assert torch.isfinite(full).all(), name
        torch.testing.assert_close(part, full[1:3], msg=name)


def test_aot_is_a_function_of_the_sorted_batch():
    b = preference_batch(22, batch=5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    for name in ("aot", "aot_unpaired"):
        base = preference_loss(name, b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, beta=0.4)
        permuted = preference_loss(
            name, b.chosen[perm], b.rejected[perm], b.ref_chosen[perm], b.ref_rejected[perm], beta=0.4
        )
        torch.testing.assert_close(permuted, base)
