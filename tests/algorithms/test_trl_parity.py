"""Parity with TRL's own implementations, on the same random inputs, to 1e-6 in float64.

TRL 1.x inlines its losses in trainer methods; ``_trl_harness`` calls those methods on stub
trainers (see its docstring). What is compared:

- DPOTrainer: every loss type per example (one pair per call), aot/aot_unpaired as batch means,
  f-divergences, a weighted combination of loss types, and the logged implicit rewards.
- CPOTrainer.cpo_loss: conservative DPO (sigmoid + label smoothing), SimPO.
- ORPOTrainer.odds_ratio_loss: the odds-ratio term and its rewards.
- KTOTrainer: kto and apo_zero_unpaired, with the KL reference point from mismatched pairs.
- RewardTrainer: Bradley-Terry with margin and centring.
- GRPOTrainer: advantages (scale group/batch/none, unscorable rewards), the policy loss for loss types
  grpo, bnpo, dr_grpo, dapo, cispo, GSPO's sequence-level ratio, the k3 KL term (values and
  gradients), the entropy bonus, and the vLLM importance-sampling ratio (token/sequence,
  truncate/mask).
- RLOOTrainer: advantages, with normalisation and with the k1 KL penalty in the reward.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.algorithms import (
    aggregate_loss,
    bradley_terry_loss,
    compute_policy_loss,
    entropy_bonus,
    group_advantages,
    kl_estimate,
    kto_loss,
    preference_loss,
    preference_rewards,
    sequence_kl,
    truncated_importance_weights,
)

from . import _trl_harness as trl
from ._data import DTYPE, policy_batch, preference_batch

ATOL = 1e-6
RTOL = 1e-6

TRL_DPO_TYPES = [
    ("sigmoid", 0.0),
    ("hinge", 0.0),
    ("ipo", 0.0),
    ("exo_pair", 1e-3),
    ("nca_pair", 0.0),
    ("robust", 0.1),
    ("bco_pair", 0.0),
    ("sppo_hard", 0.0),
    ("apo_zero", 0.0),
    ("apo_down", 0.0),
    ("discopop", 0.0),
    ("sigmoid_norm", 0.0),
]
LENGTH_NORMALISED = {"ipo", "sigmoid_norm"}


@pytest.mark.parametrize("loss_type,label_smoothing", TRL_DPO_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_loss_types_match_trl_per_example(loss_type, label_smoothing, seed):
    b = preference_batch(seed)
    beta = 0.3 if seed == 0 else 1.7
    expected = trl.trl_dpo_per_example(
        loss_type,
        b.chosen_tokens,
        b.rejected_tokens,
        b.ref_chosen,
        b.ref_rejected,
        beta=beta,
        label_smoothing=label_smoothing,
    )
    kwargs = {}
    if loss_type in LENGTH_NORMALISED:
        kwargs = {"chosen_lengths": b.chosen_lengths, "rejected_lengths": b.rejected_lengths}
    ours = preference_loss(
        loss_type,
        b.chosen,
        b.rejected,
        b.ref_chosen,
        b.ref_rejected,
        beta=beta,
        label_smoothing=label_smoothing,
        **kwargs,
    )
    assert ours.shape == (4,)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_batch_mean_matches_trl(loss_type):
    b = preference_batch(3, batch=5)
    expected = trl.trl_dpo_loss(
        [loss_type],
        b.chosen_tokens,
        b.rejected_tokens,
        b.ref_chosen,
        b.ref_rejected,
        beta=0.4,
        label_smoothing=0.1,
    )
    ours = preference_loss(
        loss_type, b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, beta=0.4, label_smoothing=0.1
    )
    torch.testing.assert_close(ours.mean(), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_f_divergence_dpo_matches_trl(f_divergence, loss_type):
    b = preference_batch(4)
    expected = trl.trl_dpo_per_example(
        loss_type,
        b.chosen_tokens,
        b.rejected_tokens,
        b.ref_chosen,
        b.ref_rejected,
        beta=0.5,
        f_divergence_type=f_divergence,
    )
    kwargs = (
        {"chosen_lengths": b.chosen_lengths, "rejected_lengths": b.rejected_lengths}
        if loss_type == "ipo"
        else {}
    )
    ours = preference_loss(
        loss_type,
        b.chosen,
        b.rejected,
        b.ref_chosen,
        b.ref_rejected,
        beta=0.5,
        f_divergence=f_divergence,
        **kwargs,
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


def test_alpha_divergence_dpo_matches_trl_in_float32():
    # TRL's alpha-divergence clamps per dtype from a table without float64, so compare in float32.
    b = preference_batch(5)
    to32 = lambda t: t.float()  # noqa: E731
    expected = trl.trl_dpo_per_example(
        "sigmoid",
        [to32(t) for t in b.chosen_tokens],
        [to32(t) for t in b.rejected_tokens],
        to32(b.ref_chosen),
        to32(b.ref_rejected),
        beta=0.5,
        f_divergence_type="alpha_divergence",
        f_alpha=0.5,
    )
    ours = preference_loss(
        "sigmoid",
        to32(b.chosen),
        to32(b.rejected),
        to32(b.ref_chosen),
        to32(b.ref_rejected),
        beta=0.5,
        f_divergence="alpha_divergence",
        f_alpha=0.5,
    )
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_weighted_combination_matches_trl():
    # MPO-style mix; TRL's "sft" is the batch token-mean NLL, equal to our per-example mean when
    # every chosen response has the same length.
    b = preference_batch(6, equal_chosen_lengths=True)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    expected = trl.trl_dpo_loss(
        types,
        b.chosen_tokens,
        b.rejected_tokens,
        b.ref_chosen,
        b.ref_rejected,
        beta=0.2,
        loss_weights=weights,
    )
    ours = preference_loss(
        types,
        b.chosen,
        b.rejected,
        b.ref_chosen,
        b.ref_rejected,
        beta=0.2,
        loss_weights=weights,
        chosen_lengths=b.chosen_lengths,
    )
    torch.testing.assert_close(ours.mean(), expected, atol=ATOL, rtol=RTOL)


def test_implicit_rewards_match_trl_metrics():
    b = preference_batch(7, batch=5)
    _, metrics = trl.trl_dpo_loss(
        ["sigmoid"],
        b.chosen_tokens,
        b.rejected_tokens,
        b.ref_chosen,
        b.ref_rejected,
        beta=0.3,
        return_metrics=True,
    )
    rewards = preference_rewards(b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, beta=0.3)
    assert rewards.chosen.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-12)
    assert rewards.rejected.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-12)
    assert rewards.margins.mean().item() == pytest.approx(metrics["rewards/margins"][-1], abs=1e-12)
    # TRL averages the accuracies as float32.
    assert rewards.accuracies.mean().item() == pytest.approx(metrics["rewards/accuracies"][-1], abs=1e-6)


@pytest.mark.parametrize("cpo_type,ours_type", [("sigmoid", "cdpo"), ("hinge", "hinge"), ("ipo", "ipo")])
def test_conservative_dpo_matches_trl_cpo_code(cpo_type, ours_type):
    # CPO's loss is DPO's with the policy log-ratio margin in place of Delta: feed it our log-ratios.
    b = preference_batch(8)
    chosen_lr, rejected_lr = b.chosen - b.ref_chosen, b.rejected - b.ref_rejected
    smoothing = 0.15 if cpo_type == "sigmoid" else 0.0
    expected, _, _ = trl.trl_cpo_loss(cpo_type, chosen_lr, rejected_lr, beta=0.7, label_smoothing=smoothing)
    ours = preference_loss(
        ours_type, b.chosen, b.rejected, b.ref_chosen, b.ref_rejected, beta=0.7, label_smoothing=smoothing
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_and_cpo_match_trl(smoothing):
    b = preference_batch(9)
    avg_c, avg_r = b.chosen / b.chosen_lengths, b.rejected / b.rejected_lengths
    expected, exp_rc, exp_rr = trl.trl_cpo_loss(
        "simpo", avg_c, avg_r, beta=2.0, label_smoothing=smoothing, simpo_gamma=0.8
    )
    # TRL: logits = delta - simpo_gamma / beta, loss on beta * logits = beta * delta - simpo_gamma.
    ours = preference_loss(
        "simpo",
        b.chosen,
        b.rejected,
        beta=2.0,
        label_smoothing=smoothing,
        simpo_gamma=0.8,
        chosen_lengths=b.chosen_lengths,
        rejected_lengths=b.rejected_lengths,
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    rewards = preference_rewards(
        b.chosen, b.rejected, beta=2.0, chosen_lengths=b.chosen_lengths, rejected_lengths=b.rejected_lengths
    )
    torch.testing.assert_close(rewards.chosen, exp_rc, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(rewards.rejected, exp_rr, atol=ATOL, rtol=RTOL)
    # CPO without the NLL term is the reference-free sigmoid loss.
    expected_cpo, _, _ = trl.trl_cpo_loss(
        "sigmoid", b.chosen, b.rejected, beta=0.2, label_smoothing=smoothing
    )
    ours_cpo = preference_loss(
        "cpo", b.chosen, b.rejected, beta=0.2, label_smoothing=smoothing, cpo_alpha=0.0
    )
    torch.testing.assert_close(ours_cpo, expected_cpo, atol=ATOL, rtol=RTOL)


def test_orpo_odds_ratio_matches_trl():
    b = preference_batch(10)
    avg_c, avg_r = b.chosen / b.chosen_lengths, b.rejected / b.rejected_lengths
    trl_terms, trl_rc, trl_rr = trl.trl_orpo_odds_ratio(avg_c, avg_r, beta=0.25)
    # TRL computes the odds ratio in float32 (it calls .float()): compare in float64 at 1e-6.
    ours = preference_loss(
        "orpo",
        b.chosen,
        b.rejected,
        beta=0.25,
        chosen_lengths=b.chosen_lengths,
        rejected_lengths=b.rejected_lengths,
        chosen_nll=torch.zeros(4, dtype=DTYPE),
    )
    torch.testing.assert_close(ours, -trl_terms.double(), atol=ATOL, rtol=RTOL)
    rewards = preference_rewards(
        b.chosen, b.rejected, beta=0.25, chosen_lengths=b.chosen_lengths, rejected_lengths=b.rejected_lengths
    )
    torch.testing.assert_close(rewards.chosen, trl_rc.double(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(rewards.rejected, trl_rr.double(), atol=ATOL, rtol=RTOL)
    # Full ORPO: NLL + odds-ratio term. With equal-length chosen responses our per-example mean NLL
    # averages to TRL's token-mean NLL.
    full = preference_loss(
        "orpo",
        b.chosen,
        b.rejected,
        beta=0.25,
        chosen_lengths=b.chosen_lengths,
        rejected_lengths=b.rejected_lengths,
    )
    torch.testing.assert_close(full, -avg_c - trl_terms.double(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(loss_type):
    g = torch.Generator().manual_seed(11)
    lengths = [2, 4, 3, 1, 5, 2]
    tokens = [-torch.rand(n, generator=g, dtype=DTYPE) for n in lengths]
    kl_tokens = [-torch.rand(n, generator=g, dtype=DTYPE) for n in reversed(lengths)]
    labels = [True, False, True, True, False, False]
    logps = torch.stack([t.sum() for t in tokens])
    kl_logps = torch.stack([t.sum() for t in kl_tokens])
    ref = logps + 0.4 * torch.randn(6, generator=g, dtype=DTYPE)
    ref_kl = kl_logps - 0.3 + 0.2 * torch.randn(6, generator=g, dtype=DTYPE)  # positive mean KL
    expected = trl.trl_kto_loss(
        tokens,
        labels,
        ref,
        kl_tokens,
        ref_kl,
        beta=0.3,
        desirable_weight=1.3,
        undesirable_weight=0.7,
        loss_type=loss_type,
    )
    ours = kto_loss(
        logps,
        ref,
        torch.tensor(labels),
        beta=0.3,
        kl_logps=kl_logps,
        ref_kl_logps=ref_kl,
        desirable_weight=1.3,
        undesirable_weight=0.7,
        loss_type=loss_type,
    )
    torch.testing.assert_close(ours.mean(), expected, atol=ATOL, rtol=RTOL)


def test_kto_paired_matches_trl_on_paired_data():
    b = preference_batch(12)
    kl_tokens = list(reversed(b.chosen_tokens)) + list(reversed(b.rejected_tokens))
    kl_logps = torch.stack([t.sum() for t in kl_tokens])
    ref_kl = kl_logps - 0.5
    expected = trl.trl_kto_loss(
        list(b.chosen_tokens) + list(b.rejected_tokens),
        [True] * 4 + [False] * 4,
        torch.cat([b.ref_chosen, b.ref_rejected]),
        kl_tokens,
        ref_kl,
        beta=0.2,
    )
    ours = preference_loss(
        "kto",
        b.chosen,
        b.rejected,
        b.ref_chosen,
        b.ref_rejected,
        beta=0.2,
        kl_logps=kl_logps,
        ref_kl_logps=ref_kl,
    )
    torch.testing.assert_close(ours.mean(), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (True, 0.01)])
def test_bradley_terry_matches_trl_reward_trainer(margin, center):
    g = torch.Generator().manual_seed(13)
    chosen = torch.randn(5, generator=g, dtype=DTYPE)
    rejected = torch.randn(5, generator=g, dtype=DTYPE)
    m = torch.rand(5, generator=g, dtype=DTYPE) if margin else None
    expected = trl.trl_reward_loss(chosen, rejected, margin=m, center_coef=center)
    ours = bradley_terry_loss(chosen, rejected, margin=m, center_coefficient=center or 0.0)
    torch.testing.assert_close(ours.mean(), expected, atol=ATOL, rtol=RTOL)


REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.2, 0.7, 0.7, 0.1, 3.0, 3.0, 3.0, 3.0], dtype=DTYPE)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("with_nan", [False, True])
def test_grpo_advantages_match_trl(scale, with_nan):
    rewards = REWARDS.clone()
    if with_nan:
        rewards[1] = float("nan")
        rewards[4] = float("nan")
    expected = trl.trl_grpo_advantages(rewards, 4, scale_rewards=scale)
    ours = group_advantages("grpo", rewards, 4, scale=scale, eps=1e-4)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    if scale == "none":
        torch.testing.assert_close(group_advantages("dr_grpo", rewards, 4), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("with_nan", [False, True])
def test_rloo_advantages_match_trl(normalize, with_nan):
    rewards = REWARDS.clone()
    if with_nan:
        rewards[0] = float("nan")
        rewards[5] = float("nan")
        rewards[6] = float("nan")  # group 1 keeps a single scored sample: no baseline, advantage 0
    expected = trl.trl_rloo_advantages(rewards, 4, normalize)
    ours = group_advantages("rloo", rewards, 4, normalize=normalize)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


def test_rloo_with_kl_in_reward_matches_trl():
    p = policy_batch(14, batch=8, width=5, junk=False)
    g = torch.Generator().manual_seed(14)
    rewards = torch.rand(8, generator=g, dtype=DTYPE)
    expected = trl.trl_rloo_advantages(
        rewards, 4, beta=0.05, logps=p.old_logprobs, ref_logps=p.ref_logprobs, mask=p.mask
    )
    penalised = rewards - 0.05 * sequence_kl("k1", p.old_logprobs, p.ref_logprobs, p.mask)
    ours = group_advantages("rloo", penalised, 4)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)


# TRL loss_type -> (our policy loss, aggregation mode, options)
GRPO_LOSS_TYPES = {
    "grpo": ("ppo", "seq-mean-token-mean", {}),
    "bnpo": ("ppo", "token-mean", {}),
    "dr_grpo": ("ppo", "seq-mean-token-sum-norm", {}),
    "dapo": ("ppo", "token-mean", {}),
    "cispo": ("cispo", "token-mean", {}),
}


@pytest.mark.parametrize("loss_type", sorted(GRPO_LOSS_TYPES))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_policy_loss_matches_trl(loss_type, beta):
    p = policy_batch(15, batch=4, width=6, junk=False)
    eps_low, eps_high = 0.2, 0.28
    trl_eps_high = 5.0 if loss_type == "cispo" else eps_high
    max_len = 8
    trl_logps = p.logprobs.clone().requires_grad_(True)
    extra = {"num_items_in_batch": float(p.mask.sum()) + 7.0} if loss_type == "dapo" else {}
    expected = trl.trl_grpo_loss(
        loss_type,
        trl_logps,
        p.old_logprobs,
        p.advantages,
        p.mask,
        epsilon_low=eps_low,
        epsilon_high=trl_eps_high,
        beta=beta,
        ref_logps=p.ref_logprobs if beta else None,
        max_completion_length=max_len,
        **extra,
    )
    name, mode, _ = GRPO_LOSS_TYPES[loss_type]
    options = (
        {"clip_high": trl_eps_high - 1.0} if name == "cispo" else {"clip_low": eps_low, "clip_high": eps_high}
    )
    logps = p.logprobs.clone().requires_grad_(True)
    out = compute_policy_loss(
        name,
        logps,
        p.old_logprobs,
        p.advantages,
        p.mask,
        loss_agg_mode=mode,
        norm_constant=max_len,
        **options,
    )
    per_token = out.per_token_loss + beta * kl_estimate("k3", logps, p.ref_logprobs)
    ours = aggregate_loss(
        per_token,
        p.mask,
        mode,
        norm_constant=max_len,
        global_num_tokens=extra.get("num_items_in_batch"),
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    (g_trl,) = torch.autograd.grad(expected, trl_logps)
    (g_ours,) = torch.autograd.grad(ours, logps)
    torch.testing.assert_close(g_ours, g_trl, atol=ATOL, rtol=RTOL)


def test_entropy_bonus_matches_trl():
    p = policy_batch(18, batch=4, width=5, junk=False)
    entropies = torch.rand(p.mask.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(18)) * 3
    expected = trl.trl_grpo_loss(
        "bnpo", p.logprobs, p.old_logprobs, p.advantages, p.mask, entropies=entropies, entropy_coef=0.03
    )
    ours = compute_policy_loss("ppo", p.logprobs, p.old_logprobs, p.advantages, p.mask).loss
    ours = ours + entropy_bonus(entropies, p.mask, coef=0.03)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    assert entropy_bonus(entropies, p.mask, coef=0.03) < 0


@pytest.mark.parametrize("loss_type,mode", [("grpo", "seq-mean-token-mean"), ("dapo", "token-mean")])
def test_gspo_sequence_ratio_matches_trl_values_and_gradients(loss_type, mode):
    p = policy_batch(20, batch=4, width=6, spread=0.3, junk=False)
    # Rows 0-1: advantage sign pushes the sequence ratio further out of [1-eps, 1+eps] -> clipped, no
    # gradient. Rows 2-3: the opposite sign -> unclipped.
    m = p.mask.bool()
    seq_lr = torch.where(m, p.logprobs - p.old_logprobs, 0.0).sum(-1) / m.sum(-1)
    assert (seq_lr.abs() > 0.05).all()
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=DTYPE)
    advantages = sign * torch.sign(seq_lr) * (0.5 + p.advantages.abs())
    trl_logps = p.logprobs.clone().requires_grad_(True)
    expected = trl.trl_grpo_loss(
        loss_type,
        trl_logps,
        p.old_logprobs,
        advantages,
        p.mask,
        epsilon_low=0.02,
        epsilon_high=0.03,
        importance_sampling_level="sequence",
    )
    logps = p.logprobs.clone().requires_grad_(True)
    ours = compute_policy_loss(
        "gspo", logps, p.old_logprobs, advantages, p.mask, loss_agg_mode=mode, clip_low=0.02, clip_high=0.03
    ).loss
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)
    (g_trl,) = torch.autograd.grad(expected, trl_logps)
    (g_ours,) = torch.autograd.grad(ours, logps)
    torch.testing.assert_close(g_ours, g_trl, atol=ATOL, rtol=RTOL)
    assert (g_ours[:2][m[:2]] == 0).all()
    assert (g_ours[2:][m[2:]] != 0).all()


@pytest.mark.parametrize(
    "trl_mode,level,mode",
    [
        ("token_truncate", "token", "truncate"),
        ("token_mask", "token", "mask"),
        ("sequence_truncate", "sequence", "truncate"),
        ("sequence_mask", "sequence", "mask"),
    ],
)
def test_importance_sampling_ratio_matches_trl(trl_mode, level, mode):
    p = policy_batch(17, batch=5, width=5, spread=0.4, junk=False)
    expected = trl.trl_importance_sampling_ratio(
        p.old_logprobs, p.ref_logprobs, p.mask, mode=trl_mode, clip_min=0.6, clip_max=1.8
    )
    ours = truncated_importance_weights(
        p.old_logprobs, p.ref_logprobs, p.mask, level=level, clip_min=0.6, clip_max=1.8, mode=mode
    )
    if level == "token":
        m = p.mask.bool()
        torch.testing.assert_close(ours.weights[m], expected[m], atol=ATOL, rtol=RTOL)
        assert (ours.weights[~m] == 0).all()
    else:
        torch.testing.assert_close(ours.weights, expected, atol=ATOL, rtol=RTOL)
    assert 0.0 < ours.metrics["clipped_frac"] < 1.0
