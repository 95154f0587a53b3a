"""Reward-model losses and reward reductions.

- Bradley-Terry pairwise loss with optional margin and reward centring (outcome reward models).
- Listwise ranking losses for K > 2 ranked responses (LiPO), registered in ``RANKING_LOSSES``.
  They take any scores -- a reward model's outputs, or DPO's implicit rewards beta * log-ratio for
  listwise preference optimisation.
- Process reward models: per-step classification at step positions, with hard or soft
  (Monte-Carlo value) labels, and PAV's advantage targets.
- Reductions of a reward-model ensemble (mean, worst case, uncertainty-weighted), registered in
  ``ENSEMBLE_REDUCTIONS``, and of several objectives (weighted sum, MaxMin), in
  ``OBJECTIVE_COMBINATIONS``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.algorithms._masked import masked_fill_zero
from posttrain.algorithms.registry import ENSEMBLE_REDUCTIONS, OBJECTIVE_COMBINATIONS, RANKING_LOSSES


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | float | None = None,
    center_coefficient: float = 0.0,
) -> Tensor:
    """Pairwise reward-model loss per example [B]:

        l = -log sigma(r_c - r_r - m) + center_coefficient * (r_c + r_r)^2

    The margin m asks for a larger gap on clearer preferences ("Llama 2: Open Foundation and Fine-Tuned
    Chat Models", 2023); the centring term keeps rewards near zero mean ("Helping or Herding? Reward
    Model Ensembles Mitigate but do not Eliminate Reward Hacking", 2023). ("Rank Analysis of Incomplete
    Block Designs: The Method of Paired Comparisons", Bradley and Terry, 1952.)"""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return loss


def _list_mask(scores: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
    if scores.dim() != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must both be [B, K]")
    if mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if mask.shape != scores.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match scores {tuple(scores.shape)}")
    return mask.bool()


def _pair_terms(scores: Tensor, labels: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """-log sigma(s_i - s_j) and a [B, K, K] mask of valid pairs with label_i > label_j."""
    better = (labels.unsqueeze(2) > labels.unsqueeze(1)) & m.unsqueeze(2) & m.unsqueeze(1)
    s = torch.where(m, scores, torch.zeros_like(scores))
    nll = -F.logsigmoid(s.unsqueeze(2) - s.unsqueeze(1))
    return nll, better


@RANKING_LOSSES.register("pairwise_logistic")
def pairwise_logistic_ranking_loss(scores: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """RankNet / Bradley-Terry over all ordered pairs: l = sum_{y_i > y_j} -log sigma(s_i - s_j).
    With K = 2 this is DPO (on implicit rewards) or the BT loss. ("Learning to Rank using Gradient
    Descent", 2005; in LiPO, 2024.)"""
    m = _list_mask(scores, labels, mask)
    nll, better = _pair_terms(scores, labels, m)
    return torch.where(better, nll, torch.zeros_like(nll)).sum((1, 2))


@RANKING_LOSSES.register("lambda")
def lipo_lambda_loss(scores: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """LiPO-lambda: l = sum_{y_i > y_j} Delta_ij * -log sigma(s_i - s_j), with the LambdaRank weight
    Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|, gain G = 2^y - 1, discount D(tau) = log2(1 + tau)
    and tau the 1-based rank of each response under the current scores (padding excluded).
    ("LiPO: Listwise Preference Optimization through Learning-to-Rank", 2024.)"""
    m = _list_mask(scores, labels, mask)
    nll, better = _pair_terms(scores, labels, m)
    with torch.no_grad():
        s = torch.where(m, scores, torch.full_like(scores, -torch.inf))
        order = torch.argsort(s, dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(1, s.shape[1] + 1, device=s.device).expand_as(order))
        inv_discount = 1.0 / torch.log2(1.0 + ranks.to(scores.dtype))
        gain = torch.pow(2.0, labels.to(scores.dtype)) - 1.0
        delta = (gain.unsqueeze(2) - gain.unsqueeze(1)).abs() * (
            inv_discount.unsqueeze(2) - inv_discount.unsqueeze(1)
        ).abs()
    return torch.where(better, delta * nll, torch.zeros_like(nll)).sum((1, 2))


@RANKING_LOSSES.register("listmle")
def listmle_loss(scores: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """ListMLE (Plackett-Luce likelihood of the labelled order): with pi the order by descending label
    (ties broken by position), l = -sum_k [ s_pi(k) - log sum_{j >= k} exp s_pi(j) ].
    ("Listwise Approach to Learning to Rank: Theory and Algorithm", 2008; in LiPO, 2024.)"""
    m = _list_mask(scores, labels, mask)
    sort_key = torch.where(m, labels.to(scores.dtype), torch.full_like(scores, -torch.inf))
    order = torch.argsort(sort_key, dim=1, descending=True, stable=True)
    s = torch.gather(torch.where(m, scores, torch.full_like(scores, -torch.inf)), 1, order)
    valid = torch.gather(m, 1, order)
    # log sum_{j >= k} exp s_j via a reversed cumulative logsumexp.
    tail = torch.logcumsumexp(s.flip(1), dim=1).flip(1)
    terms = torch.where(valid, tail - torch.where(valid, s, torch.zeros_like(s)), torch.zeros_like(s))
    return terms.sum(1)


@RANKING_LOSSES.register("softmax")
def softmax_ranking_loss(scores: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax cross-entropy (ListNet-style) with label weights: l = -sum_i (y_i / sum_j y_j) log softmax(s)_i,
    labels >= 0. ("Learning to Rank: From Pairwise Approach to Listwise Approach", 2007; in LiPO, 2024.)"""
    m = _list_mask(scores, labels, mask)
    if (torch.where(m, labels, torch.zeros_like(labels)) < 0).any():
        raise ValueError("softmax ranking loss needs non-negative labels")
    y = torch.where(m, labels.to(scores.dtype), torch.zeros_like(scores))
    target = y / y.sum(1, keepdim=True).clamp(min=1e-12)
    logp = torch.log_softmax(torch.where(m, scores, torch.full_like(scores, -torch.inf)), dim=1)
    return -torch.where(m, target * logp, torch.zeros_like(logp)).sum(1)


def listwise_ranking_loss(
    scores: Tensor, labels: Tensor, mask: Tensor | None = None, *, method: str = "lambda"
) -> Tensor:
    """Listwise loss per example [B] for scores and labels [B, K] (higher label = better), ``mask`` [B, K]
    marking real responses (lists may have different lengths). ``method`` in ``RANKING_LOSSES``:
    lambda (LiPO-lambda), listmle, pairwise_logistic, softmax."""
    return RANKING_LOSSES.get(method)(scores, labels, mask)


def process_reward_loss(
    logits: Tensor, labels: Tensor, step_mask: Tensor | None = None, *, loss_type: str = "bce"
) -> Tensor:
    """Per-step PRM loss at step positions, [B, T], zero elsewhere (reduce it with
    ``aggregate_loss(loss, step_mask, "token-mean")``).

    ``logits`` is [B, T] (one logit per position) or [B, T, 2] (two-class head, class 1 = correct);
    ``step_mask`` [B, T] marks step positions (None: every position, e.g. for logits already gathered
    at the steps, any shape). ``labels`` are hard (0/1) or soft targets in [0, 1] such as Monte-Carlo
    value estimates.
    ``loss_type``: ``bce`` (cross-entropy against the target distribution (1 - y, y)) or ``mse``
    (squared error of the raw [B, T] prediction, for regression targets such as PAV's advantages).
    ("Let's Verify Step by Step", 2023; "Math-Shepherd: Verify and Reinforce LLMs Step-by-step without
    Human Annotations", 2023; "Rewarding Progress: Scaling Automated Process Verifiers for LLM
    Reasoning", PAV, 2024.)"""
    value_shape = logits.shape[:-1] if logits.dim() == 3 else logits.shape
    m = (
        torch.ones(value_shape, dtype=torch.bool, device=logits.device)
        if step_mask is None
        else step_mask.bool()
    )
    if labels.shape != value_shape or m.shape != value_shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} and step_mask {tuple(m.shape)} must match the logits' positions "
            f"{tuple(value_shape)}"
        )
    y = masked_fill_zero(labels.to(logits.dtype), m)
    if loss_type == "bce":
        if logits.dim() == 3:
            if logits.shape[-1] != 2:
                raise ValueError("a class head for PRM must have 2 classes")
            logp = torch.log_softmax(logits, dim=-1)
            loss = -(1 - y) * logp[..., 0] - y * logp[..., 1]
        else:
            loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    elif loss_type == "mse":
        if logits.dim() == 3:
            raise ValueError("mse PRM loss needs one prediction per position, not a class head")
        loss = (logits - y) ** 2
    else:
        raise ValueError(f"Unknown PRM loss type {loss_type!r}. Valid names: bce, mse.")
    return masked_fill_zero(loss, m)


def mc_value_labels(num_correct: Tensor, num_rollouts: Tensor | int, *, mode: str = "soft") -> Tensor:
    """Math-Shepherd's automatic step labels from N completions rolled out from each step:
    ``hard`` (HE): 1 if any reaches the correct answer; ``soft`` (SE): the fraction that does.
    ("Math-Shepherd: Verify and Reinforce LLMs Step-by-step without Human Annotations", 2023.)"""
    n = torch.as_tensor(num_rollouts, dtype=torch.get_default_dtype(), device=num_correct.device)
    correct = num_correct.to(n.dtype)
    if mode == "hard":
        return (correct > 0).to(n.dtype)
    if mode == "soft":
        return correct / n.clamp(min=1)
    raise ValueError(f"Unknown MC label mode {mode!r}. Valid names: hard, soft.")


def process_advantage_labels(step_values: Tensor, step_mask: Tensor, initial_value: Tensor | float) -> Tensor:
    """PAV's targets: the progress of each step under a prover policy, A_k = Q_k - Q_{k-1}, with Q_k the
    prover's success rate after step k (e.g. :func:`mc_value_labels` soft) and Q_0 = ``initial_value``
    (the success rate from the prompt alone). Steps are the masked-in positions of ``step_values``
    [B, S] in order. ("Rewarding Progress: Scaling Automated Process Verifiers for LLM Reasoning", 2024.)"""
    m = step_mask.bool()
    q0 = torch.as_tensor(initial_value, dtype=step_values.dtype, device=step_values.device)
    prev = q0.expand(step_values.shape[0]).clone() if q0.dim() == 0 else q0.clone()
    out = torch.zeros_like(step_values)
    for k in range(step_values.shape[1]):
        on = m[:, k]
        out[:, k] = torch.where(on, step_values[:, k] - prev, torch.zeros_like(prev))
        prev = torch.where(on, step_values[:, k], prev)
    return out


@ENSEMBLE_REDUCTIONS.register("mean")
def ensemble_mean(rewards: Tensor, *, uwo_coef: float = 0.0) -> Tensor:
    """Mean over the K ensemble members: R = (1/K) sum_k R_k (the baseline in "Reward Model Ensembles Help
    Mitigate Overoptimization", Coste et al., 2023)."""
    return rewards.mean(0)


@ENSEMBLE_REDUCTIONS.register("wco")
def ensemble_worst_case(rewards: Tensor, *, uwo_coef: float = 0.0) -> Tensor:
    """Worst-case optimisation: R = min_k R_k. ("Reward Model Ensembles Help Mitigate
    Overoptimization", Coste et al., 2023.)"""
    return rewards.min(0).values


@ENSEMBLE_REDUCTIONS.register("uwo")
def ensemble_uncertainty_weighted(rewards: Tensor, *, uwo_coef: float = 0.5) -> Tensor:
    """Uncertainty-weighted optimisation: R = mean_k R_k - lambda * Var_k R_k (population variance
    across members). ("Reward Model Ensembles Help Mitigate Overoptimization", Coste et al., 2023.)"""
    return rewards.mean(0) - uwo_coef * rewards.var(0, unbiased=False)


def ensemble_reward(rewards: Tensor, method: str = "mean", *, uwo_coef: float = 0.5) -> Tensor:
    """Reduce ensemble rewards [K, B] (K reward models) to [B] with ``method`` in
    ``ENSEMBLE_REDUCTIONS`` (mean, wco, uwo). Members should share a scale (normalise each first)."""
    if rewards.dim() != 2:
        raise ValueError(f"ensemble rewards must be [K, B], got shape {tuple(rewards.shape)}")
    return ENSEMBLE_REDUCTIONS.get(method)(rewards, uwo_coef=uwo_coef)


def _objective_weights(rewards: Tensor, weights: Sequence[float] | Tensor | None) -> Tensor:
    k = rewards.shape[-1]
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=rewards.dtype, device=rewards.device)
    w = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    if w.shape != (k,):
        raise ValueError(f"{k} objectives need {k} weights, got shape {tuple(w.shape)}")
    return w


@OBJECTIVE_COMBINATIONS.register("weighted_sum")
def objectives_weighted_sum(
    rewards: Tensor, *, weights: Sequence[float] | Tensor | None = None, temperature: float = 1.0,
    batch_means: Tensor | None = None,
) -> Tensor:
    """Linear scalarisation R = sum_k w_k R_k (uniform weights by default), as in multi-objective RLHF
    and the weighting MODPO folds into DPO. ("Beyond One-Preference-Fits-All Alignment:
    Multi-Objective Direct Preference Optimization", 2023.)"""
    return rewards @ _objective_weights(rewards, weights)


@OBJECTIVE_COMBINATIONS.register("maxmin", needs=("batch_means",))
def objectives_maxmin(
    rewards: Tensor, *, weights: Sequence[float] | Tensor | None = None, temperature: float = 1.0,
    batch_means: Tensor | None = None,
) -> Tensor:
    """MaxMin-RLHF's egalitarian objective max_pi min_u E[R_u]: pick the objective (user group) with the
    lowest mean reward over the batch and return its rewards for every sample:
    R_i = R_{u*, i} with u* = argmin_u mean_i R_{u, i}. ``batch_means`` [K] are those means when the batch
    is larger than ``rewards`` (the step's batch over every rank); by default the means of ``rewards``.
    ("MaxMin-RLHF: Towards Equitable Alignment of Large Language Models with Diverse Human
    Preferences", 2024.)"""
    means = rewards.mean(0) if batch_means is None else torch.as_tensor(batch_means, dtype=rewards.dtype)
    if means.shape != (rewards.shape[-1],):
        raise ValueError(f"{rewards.shape[-1]} objectives need {rewards.shape[-1]} batch means, got {tuple(means.shape)}")
    return rewards[:, means.argmin()]


@OBJECTIVE_COMBINATIONS.register("min")
def objectives_min(
    rewards: Tensor, *, weights: Sequence[float] | Tensor | None = None, temperature: float = 1.0,
    batch_means: Tensor | None = None,
) -> Tensor:
    """Per-sample minimum over objectives: R = min_k R_k (a per-sample form of MaxMin-RLHF's egalitarian
    objective, 2024)."""
    return rewards.min(-1).values


@OBJECTIVE_COMBINATIONS.register("softmin")
def objectives_softmin(
    rewards: Tensor, *, weights: Sequence[float] | Tensor | None = None, temperature: float = 1.0,
    batch_means: Tensor | None = None,
) -> Tensor:
    """Smooth per-sample minimum: R = -T log sum_k exp(-R_k / T) (tends to min_k R_k as T -> 0; a soft form of
    MaxMin-RLHF's egalitarian objective, 2024)."""
    return -temperature * torch.logsumexp(-rewards / temperature, dim=-1)


def combine_objectives(
    rewards: Tensor,
    method: str = "weighted_sum",
    *,
    weights: Sequence[float] | Tensor | None = None,
    temperature: float = 1.0,
    batch_means: Tensor | None = None,
) -> Tensor:
    """Reduce per-objective rewards [B, K] to [B] with ``method`` in ``OBJECTIVE_COMBINATIONS``
    (weighted_sum, maxmin, min, softmin); ``batch_means`` [K] for the methods that need batch statistics
    (maxmin), e.g. gathered over ranks."""
    if rewards.dim() != 2:
        raise ValueError(f"multi-objective rewards must be [B, K], got shape {tuple(rewards.shape)}")
    return OBJECTIVE_COMBINATIONS.get(method)(rewards, weights=weights, temperature=temperature,
                                              batch_means=batch_means)
