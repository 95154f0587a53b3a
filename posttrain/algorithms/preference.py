"""Offline preference losses (the DPO family) as per-example functions.

Every loss in ``PREFERENCE_LOSSES`` takes the policy's log-probabilities of the chosen and rejected
responses, ``chosen_logps`` and ``rejected_logps`` [B], and (for losses with a reference model)
the reference model's ``ref_chosen_logps`` / ``ref_rejected_logps`` [B], and returns one loss per
example [B]. Call them through :func:`preference_loss`, which also combines several with weights.

Log-probs are summed over response tokens. The losses that need per-token averages (``ipo``,
``sigmoid_norm``, ``simpo``, ``orpo``, and the NLL terms of ``rpo``, ``cpo``, ``sft``) divide by
``chosen_lengths`` / ``rejected_lengths`` (response token counts, [B]) when given; without them
the log-probs are taken to be averages already.

Notation: Delta = (logp_c - ref_c) - (logp_r - ref_r) (DPO's implicit reward margin / beta),
sigma the logistic function, eps = label_smoothing.

The TRL loss types (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm) equal TRL 1.x's ``DPOTrainer`` per example,
including its ``f_divergence_type`` option (``f_divergence`` here). One difference by design:
``sigmoid`` honours ``label_smoothing`` (conservative DPO, as in TRL < 1.0 and TRL's CPO), while
TRL 1.x's DPOTrainer ignores it for ``sigmoid``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.algorithms.registry import PREFERENCE_LOSSES

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
BATCH_DATA = ("chosen_lengths", "rejected_lengths", "chosen_nll")


def _need_ref(ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None, name: str) -> None:
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"preference loss {name!r} needs ref_chosen_logps and ref_rejected_logps")


def _per_token(logps: Tensor, lengths: Tensor | None) -> Tensor:
    if lengths is None:
        return logps
    return logps / torch.as_tensor(lengths, dtype=logps.dtype, device=logps.device).clamp(min=1)


def _f_score(logratio: Tensor, f_divergence: str, f_alpha: float) -> Tensor:
    """f'(pi / pi_ref) for DPO under an f-divergence ("Beyond Reverse KL: Generalizing Direct
    Preference Optimization with Diverse Divergence Constraints", 2023)."""
    if f_divergence == "reverse_kl":
        return logratio
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratio)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return logratio
        t = ((f_alpha - 1.0) * logratio).clamp(max=80.0)
        return torch.expm1(t) / (f_alpha - 1.0)
    raise ValueError(f"Unknown f_divergence {f_divergence!r}. Valid names: {', '.join(F_DIVERGENCES)}.")


def _scores(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    f_divergence: str,
    f_alpha: float,
) -> tuple[Tensor, Tensor]:
    return (
        _f_score(chosen_logps - ref_chosen_logps, f_divergence, f_alpha),
        _f_score(rejected_logps - ref_rejected_logps, f_divergence, f_alpha),
    )


def _smoothed_sigmoid(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z)."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def _chosen_nll(chosen_logps: Tensor, chosen_lengths: Tensor | None, chosen_nll: Tensor | None) -> Tensor:
    """Per-example NLL of the chosen response: ``chosen_nll`` if given, else -logp_c / |y_c|."""
    if chosen_nll is not None:
        return chosen_nll
    return -_per_token(chosen_logps, chosen_lengths)


@PREFERENCE_LOSSES.register("sigmoid")
def dpo_sigmoid_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """DPO: l = -log sigma(beta Delta); with label_smoothing eps > 0, conservative DPO:
    l = -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta).
    ("Direct Preference Optimization: Your Language Model is Secretly a Reward Model", 2023;
    cDPO: "A note on DPO with noisy preferences and relationship to IPO", Mitchell, 2023.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "sigmoid")
    c, r = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha)
    return _smoothed_sigmoid(beta * (c - r), label_smoothing)


PREFERENCE_LOSSES.register("cdpo", dpo_sigmoid_loss)


@PREFERENCE_LOSSES.register("hinge")
def hinge_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """SLiC hinge: l = max(0, 1 - beta Delta). ("SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback", 2023.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "hinge")
    c, r = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha)
    return torch.relu(1 - beta * (c - r))


@PREFERENCE_LOSSES.register("ipo")
def ipo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """IPO: l = (Delta_avg - 1/(2 beta))^2, Delta_avg using per-token average log-ratios (divide by
    the lengths; beta is the paper's tau). ("A General Theoretical Paradigm to Understand Learning
    from Human Preferences", 2023.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "ipo")
    c, r = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha)
    delta = _per_token(c, chosen_lengths) - _per_token(r, rejected_lengths)
    return (delta - 1 / (2 * beta)) ** 2


@PREFERENCE_LOSSES.register("sigmoid_norm")
def sigmoid_norm_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """Length-normalised DPO: l = -log sigma(beta Delta_avg) with per-token average log-ratios.
    (DPO, 2023, with the length normalisation of TRL's ``sigmoid_norm``.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "sigmoid_norm")
    c, r = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha)
    return -F.logsigmoid(beta * (_per_token(c, chosen_lengths) - _per_token(r, rejected_lengths)))


@PREFERENCE_LOSSES.register("robust")
def robust_dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """Robust DPO, unbiased under a label-flip rate eps:
    l = [-(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)] / (1 - 2 eps).
    ("Provably Robust DPO: Aligning Language Models with Noisy Feedback", 2024.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "robust")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    c, r = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha)
    z = beta * (c - r)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@PREFERENCE_LOSSES.register("exo_pair")
def exo_pair_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 1e-3,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """EXO (pairwise): reverse KL from the model's pair distribution q = softmax(beta * logratios) to
    the smoothed label distribution p = (1 - eps, eps):
    l = sigma(z)(log sigma(z) - log(1 - eps)) + sigma(-z)(log sigma(-z) - log eps), z = beta Delta.
    eps must be > 0. ("Towards Efficient Exact Optimization of Language Model Alignment", 2024.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "exo_pair")
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (e.g. 1e-3), got {label_smoothing}")
    c, r = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha)
    z = beta * (c - r)
    eps = label_smoothing
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


@PREFERENCE_LOSSES.register("nca_pair")
def nca_pair_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
) -> Tensor:
    """NCA (pairwise): with r_c = beta (logp_c - ref_c), r_r = beta (logp_r - ref_r),
    l = -log sigma(r_c) - 0.5 log sigma(-r_c) - 0.5 log sigma(-r_r).
    ("Noise Contrastive Alignment of Language Models with Explicit Rewards", 2024.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "nca_pair")
    rc = beta * (chosen_logps - ref_chosen_logps)
    rr = beta * (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


@PREFERENCE_LOSSES.register("bco_pair")
def bco_pair_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
) -> Tensor:
    """BCO (pairwise, no reward shift): l = -log sigma(r_c) - log sigma(-r_r), r = beta (logp - ref).
    ("Binary Classifier Optimization for Large Language Model Alignment", 2024.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "bco_pair")
    rc = beta * (chosen_logps - ref_chosen_logps)
    rr = beta * (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(rc) - F.logsigmoid(-rr)


@PREFERENCE_LOSSES.register("sppo_hard")
def sppo_hard_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
) -> Tensor:
    """SPPO with hard win probabilities (1 for the winner, 0 for the loser):
    l = (logp_c - ref_c - 1/(2 beta))^2 + (logp_r - ref_r + 1/(2 beta))^2.
    ("Self-Play Preference Optimization for Language Model Alignment", 2024.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "sppo_hard")
    return (chosen_logps - ref_chosen_logps - 0.5 / beta) ** 2 + (
        rejected_logps - ref_rejected_logps + 0.5 / beta
    ) ** 2


@PREFERENCE_LOSSES.register("aot")
def aot_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT (paired): distributional alignment by optimal transport. Sort the batch's policy log-ratios
    u = logp_c - logp_r and reference log-ratios v = ref_c - ref_r, then
    l_k = -(1 - eps) log sigma(beta (u_(k) - v_(k))) - eps log sigma(-beta (u_(k) - v_(k))).
    Entry k belongs to the k-th order statistics, not to example k: only the batch mean is meaningful,
    and it couples the examples of the batch. ("Distributional Preference Alignment of LLMs via
    Optimal Transport", 2024.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "aot")
    u = torch.sort(chosen_logps - rejected_logps, dim=0).values
    v = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values
    return _smoothed_sigmoid(beta * (u - v), label_smoothing)


@PREFERENCE_LOSSES.register("aot_unpaired")
def aot_unpaired_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT (unpaired): with c = sort(logp_c - ref_c) and r = sort(logp_r - ref_r) over the batch,
    l_k = -(1 - eps) log sigma(beta (c_(k) - r_(k))) - eps log sigma(-beta (c_(k) - r_(k)))
    (order statistics, as for ``aot``). ("Distributional Preference Alignment of LLMs via Optimal
    Transport", 2024.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "aot_unpaired")
    c = torch.sort(chosen_logps - ref_chosen_logps, dim=0).values
    r = torch.sort(rejected_logps - ref_rejected_logps, dim=0).values
    return _smoothed_sigmoid(beta * (c - r), label_smoothing)


@PREFERENCE_LOSSES.register("apo_zero")
def apo_zero_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
) -> Tensor:
    """APO-zero (chosen better than the model's own outputs): l = 1 - sigma(r_c) + sigma(r_r),
    r = beta (logp - ref). ("Anchored Preference Optimization and Contrastive Revisions: Addressing
    Underspecification in Alignment", 2024.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "apo_zero")
    rc = beta * (chosen_logps - ref_chosen_logps)
    rr = beta * (rejected_logps - ref_rejected_logps)
    return 1 - torch.sigmoid(rc) + torch.sigmoid(rr)


@PREFERENCE_LOSSES.register("apo_down")
def apo_down_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
) -> Tensor:
    """APO-down (chosen worse than the model's own outputs): l = sigma(r_c) + 1 - sigma(r_c - r_r).
    (APO, 2024.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "apo_down")
    rc = beta * (chosen_logps - ref_chosen_logps)
    rr = beta * (rejected_logps - ref_rejected_logps)
    return torch.sigmoid(rc) + 1 - torch.sigmoid(rc - rr)


@PREFERENCE_LOSSES.register("discopop")
def discopop_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    discopop_tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """DiscoPOP (log-ratio modulated): z = beta Delta, w = sigma(z / tau),
    l = (1 - w)(-log sigma(z)) + w exp(-z). ("Discovering Preference Optimization Algorithms with and
    for Large Language Models", 2024.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "discopop")
    c, r = _scores(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha)
    z = beta * (c - r)
    w = torch.sigmoid(z / discopop_tau)
    return -F.logsigmoid(z) * (1 - w) + torch.exp(-z) * w


@PREFERENCE_LOSSES.register("sft")
def sft_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    chosen_nll: Tensor | None = None,
) -> Tensor:
    """NLL of the chosen response, l = -logp_c / |y_c| (or ``chosen_nll``). Combined with a DPO loss
    by weights this is RPO ("Iterative Reasoning Preference Optimization", 2024). (TRL's ``sft`` is the
    batch token-mean; equal when lengths are equal.)"""
    return _chosen_nll(chosen_logps, chosen_lengths, chosen_nll)


@PREFERENCE_LOSSES.register("rpo")
def rpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    rpo_alpha: float = 1.0,
    chosen_lengths: Tensor | None = None,
    chosen_nll: Tensor | None = None,
) -> Tensor:
    """RPO: DPO plus a length-normalised NLL on the chosen response,
    l = -log sigma(beta Delta) + alpha * (-logp_c / |y_c|).
    ("Iterative Reasoning Preference Optimization", 2024; also used in "Tulu 3", 2024.)"""
    dpo = dpo_sigmoid_loss(
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
    )
    return dpo + rpo_alpha * _chosen_nll(chosen_logps, chosen_lengths, chosen_nll)


@PREFERENCE_LOSSES.register("simpo")
def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    """SimPO (reference-free, average log-prob rewards, target margin gamma):
    l = -log sigma(beta (logp_c/|y_c| - logp_r/|y_r|) - gamma) (label smoothing as in cDPO).
    Reference log-probs are ignored. The paper uses beta around 2 and gamma/beta around 0.5.
    ("SimPO: Simple Preference Optimization with a Reference-Free Reward", 2024.)"""
    delta = _per_token(chosen_logps, chosen_lengths) - _per_token(rejected_logps, rejected_lengths)
    return _smoothed_sigmoid(beta * delta - simpo_gamma, label_smoothing)


@PREFERENCE_LOSSES.register("cpo")
def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    chosen_lengths: Tensor | None = None,
    chosen_nll: Tensor | None = None,
) -> Tensor:
    """CPO (reference-free DPO plus NLL): l = -log sigma(beta (logp_c - logp_r)) + alpha * NLL(y_c).
    ("Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine
    Translation", 2024.)"""
    pref = _smoothed_sigmoid(beta * (chosen_logps - rejected_logps), label_smoothing)
    if cpo_alpha == 0:
        return pref
    return pref + cpo_alpha * _chosen_nll(chosen_logps, chosen_lengths, chosen_nll)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds_ratio(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor) -> Tensor:
    """log [odds(y_c) / odds(y_r)], odds(y) = p / (1 - p), p = exp(average per-token log-prob)."""
    return (chosen_avg_logps - rejected_avg_logps) - (
        log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps)
    )


@PREFERENCE_LOSSES.register("orpo")
def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    chosen_nll: Tensor | None = None,
) -> Tensor:
    """ORPO (reference-free, odds ratio on average log-probs; beta is the paper's lambda):
    l = NLL(y_c) - beta * log sigma(log odds(y_c) - log odds(y_r)),  odds(y) = P(y) / (1 - P(y)),
    P(y) = exp(logp / |y|). The NLL is ``chosen_nll`` when given (TRL's is the token mean over prompt and
    response), else -logp_c / |y_c|; pass zeros to get the odds-ratio term alone.
    ("ORPO: Monolithic Preference Optimization without Reference Model", 2024.)"""
    c = _per_token(chosen_logps, chosen_lengths)
    r = _per_token(rejected_logps, rejected_lengths)
    ratio_term = -beta * F.logsigmoid(orpo_log_odds_ratio(c, r))
    return _chosen_nll(chosen_logps, chosen_lengths, chosen_nll) + ratio_term


@PREFERENCE_LOSSES.register("modpo")
def modpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    modpo_weights: Sequence[float],
    margin_rewards_chosen: Tensor,
    margin_rewards_rejected: Tensor,
) -> Tensor:
    """MODPO: DPO on objective 0 with the other objectives' rewards as a margin. With weights
    w = (w_0, w_1, ..., w_{K-1}) and rewards r_k (k >= 1) from the other objectives' reward models,

        l = -log sigma( (beta / w_0) Delta - (1 / w_0) sum_{k>=1} w_k (r_k(y_c) - r_k(y_r)) ).

    ``margin_rewards_*`` are [B, K-1] (or [B] when K = 2).
    ("Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference Optimization", 2023.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "modpo")
    w = torch.as_tensor(list(modpo_weights), dtype=chosen_logps.dtype, device=chosen_logps.device)
    if w.numel() < 2 or w[0] <= 0:
        raise ValueError("modpo_weights needs at least two weights with w_0 > 0")
    margins = margin_rewards_chosen - margin_rewards_rejected
    if margins.dim() == 1:
        margins = margins.unsqueeze(-1)
    if margins.shape[-1] != w.numel() - 1:
        raise ValueError(
            f"{w.numel()} weights need {w.numel() - 1} margin rewards per example, got {margins.shape[-1]}"
        )
    delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    logits = (beta * delta - (margins * w[1:]).sum(-1)) / w[0]
    return -F.logsigmoid(logits)


def kto_kl_reference(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean(logp(y'|x) - ref_logp(y'|x))) over mismatched pairs
    (each completion paired with another example's prompt), detached. Under several ranks, all-reduce
    the mean before the clamp, or compute z0 yourself and pass it as ``kl``."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    *,
    beta: float = 0.1,
    kl: Tensor | float | None = None,
    kl_logps: Tensor | None = None,
    ref_kl_logps: Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> Tensor:
    """KTO on unpaired data: per example with logratio r = logp - ref_logp and reference point z0,

        desirable (label True):    l = w_d (1 - sigma(beta (r - z0)))
        undesirable (label False): l = w_u (1 - sigma(beta (z0 - r)))

    z0 is ``kl`` if given, else :func:`kto_kl_reference` of ``kl_logps`` / ``ref_kl_logps``.
    ``loss_type="apo_zero_unpaired"`` drops z0: l = w_d (1 - sigma(beta r)) or w_u sigma(beta r).
    Returns [B] in input order (TRL returns desirable then undesirable; the mean is the same).
    ("KTO: Model Alignment as Prospect Theoretic Optimization", 2024.)"""
    desirable = labels.bool()
    logratio = logps - ref_logps
    if loss_type == "kto":
        if kl is None:
            if kl_logps is None or ref_kl_logps is None:
                raise ValueError("KTO needs its reference point: pass kl, or kl_logps and ref_kl_logps")
            kl = kto_kl_reference(kl_logps, ref_kl_logps)
        z0 = torch.as_tensor(kl, dtype=logps.dtype, device=logps.device).detach()
        loss_d = 1 - torch.sigmoid(beta * (logratio - z0))
        loss_u = 1 - torch.sigmoid(beta * (z0 - logratio))
    elif loss_type == "apo_zero_unpaired":
        loss_d = 1 - torch.sigmoid(beta * logratio)
        loss_u = torch.sigmoid(beta * logratio)
    else:
        raise ValueError(f"Unknown KTO loss type {loss_type!r}. Valid names: apo_zero_unpaired, kto.")
    return torch.where(desirable, desirable_weight * loss_d, undesirable_weight * loss_u)


@PREFERENCE_LOSSES.register("kto")
def kto_pair_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    kl: Tensor | float | None = None,
    kl_logps: Tensor | None = None,
    ref_kl_logps: Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO applied to paired data (chosen = desirable, rejected = undesirable): the mean of the two
    examples' KTO losses, so the batch mean equals KTO's mean over the 2B unpaired examples.
    z0 from ``kl`` or ``kl_logps``/``ref_kl_logps`` as in :func:`kto_loss`. (KTO, 2024.)"""
    _need_ref(ref_chosen_logps, ref_rejected_logps, "kto")
    logps = torch.cat([chosen_logps, rejected_logps])
    ref = torch.cat([ref_chosen_logps, ref_rejected_logps])
    labels = torch.cat(
        [torch.ones_like(chosen_logps, dtype=torch.bool), torch.zeros_like(rejected_logps, dtype=torch.bool)]
    )
    per = kto_loss(
        logps,
        ref,
        labels,
        beta=beta,
        kl=kl,
        kl_logps=kl_logps,
        ref_kl_logps=ref_kl_logps,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    n = chosen_logps.shape[0]
    return 0.5 * (per[:n] + per[n:])


def preference_loss(
    loss_type: str | Sequence[str],
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    **kwargs: Any,
) -> Tensor:
    """Per-example preference losses [B].

    ``loss_type`` is a name in ``PREFERENCE_LOSSES`` or a list of names, combined as
    sum_k loss_weights[k] * loss_k (weights default to 1; e.g. ``["sigmoid", "sft"]`` with weights
    ``[1, alpha]`` is RPO, ``["sigmoid", "bco_pair", "sft"]`` is MPO).

    ``kwargs`` are per-example batch data and the options of the selected losses. Batch data --
    ``chosen_lengths``/``rejected_lengths`` (response token counts; pass summed log-probs with them,
    never pre-averaged ones) and ``chosen_nll`` -- may always be passed and is used by the losses that
    need it. Options: ``f_divergence``/``f_alpha``, ``discopop_tau``, ``simpo_gamma``, ``rpo_alpha``,
    ``cpo_alpha``, KTO's ``kl``/``kl_logps``/``ref_kl_logps``/``desirable_weight``/
    ``undesirable_weight``, MODPO's ``modpo_weights``/``margin_rewards_chosen``/
    ``margin_rewards_rejected``. Each loss receives the options it accepts; an option no selected
    loss accepts is an error (a typo must not pass silently), as is a non-zero ``label_smoothing``
    none of them uses.

    The implicit rewards for logging come from :func:`preference_rewards`.
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type is empty")
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"{len(types)} loss types but {len(weights)} loss_weights")
    # Per-example batch data, not options: every loss may receive them and those that need them use them.
    used: set[str] = {k for k in BATCH_DATA if k in kwargs}
    smoothing_used = False
    total: Tensor | None = None
    for name, weight in zip(types, weights, strict=True):
        fn = PREFERENCE_LOSSES.get(name)
        params = inspect.signature(fn).parameters
        options = {k: v for k, v in kwargs.items() if k in params}
        used.update(options)
        if "label_smoothing" in params:
            options["label_smoothing"] = label_smoothing
            smoothing_used = True
        loss = fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta, **options)
        total = weight * loss if total is None else total + weight * loss
    unknown = sorted(set(kwargs) - used)
    if unknown:
        raise TypeError(f"option(s) {unknown} are not accepted by preference loss(es) {types}")
    if label_smoothing and not smoothing_used:
        raise ValueError(f"label_smoothing={label_smoothing} is not used by preference loss(es) {types}")
    assert total is not None
    return total


class PreferenceRewards(NamedTuple):
    """Detached implicit rewards [B] and their margins and accuracies, for logging."""

    chosen: Tensor
    rejected: Tensor
    margins: Tensor
    accuracies: Tensor


def preference_rewards(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> PreferenceRewards:
    """Implicit rewards: r_c = beta (logp_c - ref_c), r_r = beta (logp_r - ref_r), margins r_c - r_r,
    accuracies 1[r_c > r_r]. Without reference log-probs (SimPO, ORPO, CPO) the rewards are
    beta * logp (per token when lengths are given, as SimPO's reward is). All detached."""
    c = _per_token(chosen_logps.detach(), chosen_lengths)
    r = _per_token(rejected_logps.detach(), rejected_lengths)
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        c = c - _per_token(ref_chosen_logps.detach(), chosen_lengths)
        r = r - _per_token(ref_rejected_logps.detach(), rejected_lengths)
    elif (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    chosen, rejected = beta * c, beta * r
    return PreferenceRewards(chosen, rejected, chosen - rejected, (chosen > rejected).to(chosen.dtype))
