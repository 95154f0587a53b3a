"""Policy-gradient losses, the entropy bonus and the clipped value loss.

Every policy loss in ``POLICY_LOSSES`` has the signature

    fn(logprobs, old_logprobs, advantages, mask, **options) -> PolicyLossOutput

with ``logprobs`` [B, T] from the model being trained (with grad), ``old_logprobs`` [B, T] from the
policy that produced the samples (or the learner's recomputation of them), ``advantages`` [B, T] or
[B] (broadcast over tokens) and ``mask`` [B, T] of 0/1 marking loss tokens. It returns the per-token
loss [B, T] (zero outside the mask) and detached metrics; :func:`compute_policy_loss` looks a loss up
by name and reduces it with :func:`aggregate_loss`.

Log-ratios are clamped to [-20, 20] before exponentiation (as verl and OpenRLHF do) so a far-off
sample cannot overflow; within that range values are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from posttrain.algorithms._masked import broadcast_to_tokens, masked_fill_zero, masked_mean
from posttrain.algorithms.aggregation import aggregate_loss
from posttrain.algorithms.registry import POLICY_LOSSES

LOG_RATIO_CLAMP = 20.0


@dataclass
class PolicyLossOutput:
    """Per-token loss [B, T] (zero outside the mask) and detached scalar metrics."""

    per_token_loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class PolicyLossResult:
    """The aggregated scalar ``loss``, the per-token loss it came from, and metrics."""

    loss: Tensor
    per_token_loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def _check(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    if not (logprobs.shape == old_logprobs.shape == mask.shape) or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
            f"{tuple(mask.shape)} must share one [B, T] shape"
        )
    return broadcast_to_tokens(advantages, logprobs).detach(), mask.bool()


def _token_log_ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    return (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _sequence_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's token-level form of the sequence ratio, in log space:
    log s_it = sg[ (1/|y|) sum_t (logp_t - old_t) ] + logp_t - sg[logp_t].
    Its value is the length-normalised sequence log-ratio at every token; its gradient at token t is
    that of logp_t scaled by s_i, so with seq-mean-token-mean aggregation it equals the gradient of
    exp(mean log-ratio) without stop-gradient."""
    seq = masked_mean(logprobs.detach() - old_logprobs.detach(), mask, dim=-1)
    seq = seq.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).unsqueeze(-1)
    return seq + logprobs - logprobs.detach()


def _metric(x: Tensor, mask: Tensor) -> Tensor:
    """Detached masked mean of a metric (booleans count as 0/1)."""
    x = x.detach()
    return masked_mean(x if x.is_floating_point() else x.to(torch.get_default_dtype()), mask)


@POLICY_LOSSES.register("ppo")
def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    ratio_level: str = "token",
) -> PolicyLossOutput:
    """PPO clipped surrogate, per token:

        r = pi / pi_old,   l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))

    ``clip_high`` > ``clip_low`` is DAPO's clip-higher (asymmetric range; default: same as clip_low).
    ``dual_clip`` = c > 1 bounds the loss for negative advantages at -A c, so a huge ratio on a bad
    token cannot blow up the update: for A < 0, l = min(l, -A c).
    ``ratio_level="sequence"`` uses GSPO's length-normalised sequence ratio (see ``gspo``).

    ("Proximal Policy Optimization Algorithms", 2017; dual-clip from "Mastering Complex Control in
    MOBA Games with Deep Reinforcement Learning", 2019; clip-higher from "DAPO: An Open-Source LLM
    Reinforcement Learning System at Scale", 2025.)
    """
    adv, m = _check(logprobs, old_logprobs, advantages, mask)
    clip_high = clip_low if clip_high is None else clip_high
    if ratio_level == "token":
        log_ratio = _token_log_ratio(logprobs, old_logprobs)
    elif ratio_level == "sequence":
        log_ratio = _sequence_log_ratio(logprobs, old_logprobs, m)
    else:
        raise ValueError(f"Unknown ratio_level {ratio_level!r}. Valid names: sequence, token.")
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    metrics: dict[str, Tensor] = {}
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -adv * dual_clip
        metrics["dual_clipfrac"] = _metric((adv < 0) & (loss > bound), m)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    r = ratio.detach()
    metrics.update(
        clipfrac=_metric(clipped > unclipped, m),
        clipfrac_low=_metric((r < 1.0 - clip_low) & (adv < 0), m),
        clipfrac_high=_metric((r > 1.0 + clip_high) & (adv > 0), m),
        approx_kl=_metric(-log_ratio, m),
        ratio_mean=_metric(r, m),
        ratio_max=torch.where(m, r, torch.full_like(r, -torch.inf)).max().clamp(min=0),
    )
    return PolicyLossOutput(masked_fill_zero(loss, m), metrics)


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float | None = 4e-4,
) -> PolicyLossOutput:
    """GSPO: PPO clipping applied to the sequence-level ratio
    s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|) = exp((1/|y_i|) sum_t log(pi_t / pi_old_t)),
    l_i = max(-A_i s_i, -A_i clip(s_i, 1 - clip_low, 1 + clip_high)); default ranges from the paper.
    Use with ``seq-mean-token-mean`` aggregation.
    ("Group Sequence Policy Optimization", Qwen, 2025.)"""
    return ppo_clip_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        ratio_level="sequence",
    )


@POLICY_LOSSES.register("cispo")
def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float | None = None,
    clip_high: float = 4.0,
) -> PolicyLossOutput:
    """CISPO: clip the importance weight, not the update, and stop its gradient:

        l = -sg[clip(r, 1 - clip_low, 1 + clip_high)] * A * log pi

    so every token keeps a gradient (A * grad log pi, scaled by the truncated weight). No lower bound
    by default; the default upper bound r <= 5 is ScaleRL's recommendation (TRL's ``epsilon_high``
    for cispo is the bound itself, 1 + clip_high here).
    ("MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention", 2025.)"""
    adv, m = _check(logprobs, old_logprobs, advantages, mask)
    ratio = torch.exp(_token_log_ratio(logprobs, old_logprobs)).detach()
    low = None if clip_low is None else 1.0 - clip_low
    weight = torch.clamp(ratio, min=low, max=1.0 + clip_high)
    loss = -weight * adv * logprobs
    metrics = {
        "clipfrac": _metric(weight != ratio, m),
        "approx_kl": _metric(-(logprobs - old_logprobs), m),
        "ratio_mean": _metric(ratio, m),
    }
    return PolicyLossOutput(masked_fill_zero(loss, m), metrics)


def _token_covariance(advantages: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """Centred product (A - mean A)(log pi - mean log pi) over the batch's loss tokens (detached)."""
    a = advantages.detach()
    lp = logprobs.detach()
    return (a - masked_mean(a, mask)) * (lp - masked_mean(lp, mask))


@POLICY_LOSSES.register("clip_cov")
def clip_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    generator: torch.Generator | None = None,
) -> PolicyLossOutput:
    """Clip-Cov: the PPO clipped loss, with the gradient detached on a random subset of
    max(1, floor(clip_cov_ratio * N)) loss tokens whose covariance Cov_t = (A_t - mean A)(log pi_t -
    mean log pi) lies in (clip_cov_lb, clip_cov_ub), among tokens the ratio clip has not already cut.
    High-covariance tokens drive entropy collapse. ``generator`` makes the draw reproducible.
    ("The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models", 2025.)"""
    adv, m = _check(logprobs, old_logprobs, advantages, mask)
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(_token_log_ratio(logprobs, old_logprobs))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    cut_by_ratio = clipped > unclipped
    cov = _token_covariance(adv, logprobs, m)
    candidates = m & ~cut_by_ratio & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    n_select = max(int(clip_cov_ratio * int(m.sum())), 1)
    flat = torch.nonzero(candidates.reshape(-1)).squeeze(-1)
    chosen = torch.zeros(m.numel(), dtype=torch.bool, device=m.device)
    if flat.numel() > 0:
        perm = torch.randperm(flat.numel(), generator=generator).to(flat.device)
        chosen[flat[perm[:n_select]]] = True
    chosen = chosen.view_as(m)
    # Detach the ratio on chosen tokens: same value, no gradient through them.
    ratio = torch.where(chosen, ratio.detach(), ratio)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
    metrics = {
        "clipfrac": _metric(cut_by_ratio, m),
        "cov_detached_frac": _metric(chosen, m),
        "approx_kl": _metric(-(logprobs - old_logprobs), m),
    }
    return PolicyLossOutput(masked_fill_zero(loss, m), metrics)


@POLICY_LOSSES.register("kl_cov")
def kl_cov_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    kl_cov_ratio: float = 2e-3,
    ppo_kl_coef: float = 1.0,
) -> PolicyLossOutput:
    """KL-Cov: the unclipped surrogate -A r, plus a KL penalty coef * |log pi - log pi_old| on the
    top max(1, floor(kl_cov_ratio * N)) loss tokens by covariance Cov_t = (A_t - mean A)(log pi_t -
    mean log pi). ("The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models", 2025.)"""
    adv, m = _check(logprobs, old_logprobs, advantages, mask)
    log_ratio = _token_log_ratio(logprobs, old_logprobs)
    ratio = torch.exp(log_ratio)
    loss = -adv * ratio
    cov = torch.where(m, _token_covariance(adv, logprobs, m), torch.full_like(ratio, -torch.inf))
    n_valid = int(m.sum())
    selected = torch.zeros(m.numel(), dtype=torch.bool, device=m.device)
    if n_valid > 0:
        k = max(1, int(n_valid * kl_cov_ratio))
        selected[torch.topk(cov.reshape(-1).detach(), k).indices] = True
    selected = selected.view_as(m)
    loss = torch.where(selected, loss + ppo_kl_coef * log_ratio.abs(), loss)
    metrics = {
        "kl_cov_frac": _metric(selected, m),
        "approx_kl": _metric(-log_ratio, m),
        "abs_kl": _metric(log_ratio.abs(), m),
    }
    return PolicyLossOutput(masked_fill_zero(loss, m), metrics)


@POLICY_LOSSES.register("oreal")
def oreal_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
) -> PolicyLossOutput:
    """OREAL's loss ("Exploring the Limit of Outcome Reward for Learning Mathematical Reasoning", Lyu et al.,
    2025, arXiv 2502.06781), per token, with the ``oreal`` advantages (positive exactly on correct responses):

        A > 0 (correct):     l = -A log pi                                   behaviour cloning on the positives
        A <= 0 (incorrect):  l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))   policy gradient on the
                                                                             negatives' reshaped reward

    The paper takes one on-policy update per rollout, where r = 1 and the negatives' term is its -A r; the
    clip only acts on later epochs. Its token-level reward model weights each token (w_t); here every token
    weighs 1 (``compute_policy_loss``'s ``importance_weights`` can carry such weights)."""
    adv, m = _check(logprobs, old_logprobs, advantages, mask)
    pg = ppo_clip_loss(logprobs, old_logprobs, adv, mask, clip_low=clip_low, clip_high=clip_high)
    positive = adv > 0
    loss = torch.where(positive, -adv * logprobs, pg.per_token_loss)
    metrics = {**pg.metrics, "bc_token_frac": _metric(positive, m)}
    return PolicyLossOutput(masked_fill_zero(loss, m), metrics)


def compute_policy_loss(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_agg_mode: str = "token-mean",
    importance_weights: Tensor | None = None,
    global_num_tokens: float | Tensor | None = None,
    global_num_seqs: float | Tensor | None = None,
    norm_constant: float | None = None,
    gradient_divisor: float = 1.0,
    **options: Any,
) -> PolicyLossResult:
    """Look up policy loss ``name`` (ppo, gspo, cispo, clip_cov, kl_cov, ...), compute it, multiply by
    ``importance_weights`` (e.g. truncated IS weights between sampler and learner, [B, T] or [B, 1],
    treated as constants) and aggregate with ``loss_agg_mode``. ``options`` go to the loss (clip_low,
    clip_high, dual_clip, ratio_level, ...); the global counts and ``gradient_divisor`` go to
    :func:`aggregate_loss`."""
    out = POLICY_LOSSES.get(name)(logprobs, old_logprobs, advantages, mask, **options)
    per_token = out.per_token_loss
    if importance_weights is not None:
        per_token = per_token * importance_weights.detach()
    loss = aggregate_loss(
        per_token,
        mask,
        loss_agg_mode,
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        norm_constant=norm_constant,
        gradient_divisor=gradient_divisor,
    )
    return PolicyLossResult(loss, per_token, out.metrics)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position: H = logsumexp(z) - sum softmax(z) z.
    [..., V] -> [...]."""
    log_z = torch.logsumexp(logits, dim=-1)
    return log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def entropy_bonus(
    entropy: Tensor, mask: Tensor, *, coef: float, loss_agg_mode: str = "token-mean", **agg_kwargs: Any
) -> Tensor:
    """The term to add to the loss for an entropy bonus: -coef * agg(H) (maximising entropy).
    ("Asynchronous Methods for Deep Reinforcement Learning", 2016.)"""
    return -coef * aggregate_loss(entropy, mask, loss_agg_mode, **agg_kwargs)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
    **agg_kwargs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO value loss with clipping around the old values:

        v_clip = v_old + clip(v - v_old, -eps, eps),   l = 0.5 * max((v - R)^2, (v_clip - R)^2)

    (``clip_range=None``: l = 0.5 (v - R)^2). Returns (aggregated loss, metrics with ``vf_clipfrac``).
    ("Proximal Policy Optimization Algorithms", 2017; value clipping as in PPO-max, "Secrets of RLHF in
    Large Language Models Part I: PPO", 2023.)"""
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError("values, old_values, returns and mask must share one [B, T] shape")
    m = mask.bool()
    returns = returns.detach()
    err = (values - returns) ** 2
    metrics: dict[str, Tensor] = {}
    if clip_range is not None:
        v_clip = old_values.detach() + torch.clamp(values - old_values.detach(), -clip_range, clip_range)
        err_clip = (v_clip - returns) ** 2
        metrics["vf_clipfrac"] = _metric(err_clip > err, m)
        err = torch.maximum(err, err_clip)
    loss = 0.5 * aggregate_loss(masked_fill_zero(err, m), mask, loss_agg_mode, **agg_kwargs)
    metrics["value_mean"] = _metric(values, m)
    return loss, metrics
