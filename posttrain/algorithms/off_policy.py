"""Off-policy corrections between the sampler (vLLM) and the learner.

The rollout engine samples with its own kernels, precision and sometimes stale weights, so its
log-probs differ from the learner's for the same tokens: the "on-policy" update is in fact off-policy.
Truncated importance sampling (TIS) reweights each token (or sequence) by the learner/sampler ratio,
truncated so a single token cannot dominate:

    w = min(pi_learner / pi_sampler, C)      (token level)
    w = min(prod_t pi_learner_t / pi_sampler_t, C)   (sequence level)

("Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", Yao et al., 2025; the
masked variant, which drops instead of truncating, is MIS as in TRL's ``*_mask`` modes.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from posttrain.algorithms._masked import masked_fill_zero, masked_mean, masked_sum


@dataclass
class ImportanceWeights:
    """``weights``: [B, T] for token level, [B, 1] for sequence levels (detached, broadcast over
    tokens); ``metrics``: detached scalars."""

    weights: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def truncated_importance_weights(
    learner_logprobs: Tensor,
    sampler_logprobs: Tensor,
    mask: Tensor,
    *,
    level: str = "token",
    clip_max: float = 2.0,
    clip_min: float | None = None,
    mode: str = "truncate",
) -> ImportanceWeights:
    """Importance weights pi_learner / pi_sampler for the sampled tokens.

    ``level``: ``token`` (one weight per token), ``sequence`` (product over the sequence, i.e.
    exp of the summed log-ratio, as in TRL's ``sequence_*`` modes) or ``geometric`` (exp of the mean
    log-ratio). ``mode``: ``truncate`` clamps to [clip_min, clip_max]; ``mask`` sets weights outside
    that interval to 0. Sampler log-probs that are NaN (not returned by the engine) count as a ratio
    of 1. Padding positions get weight 0 at token level.

    Metrics (over loss tokens, or over sequences for sequence levels): ``mean_ratio``, ``max_ratio``,
    ``min_ratio`` (before truncation), ``clipped_frac`` (share truncated or masked),
    ``mean_weight`` (after truncation), ``kl_k1`` and ``kl_k3`` (sampler -> learner, per token)
    and ``ess`` (normalised effective sample size (sum w)^2 / (n sum w^2), 1 = on-policy).
    """
    if not (learner_logprobs.shape == sampler_logprobs.shape == mask.shape):
        raise ValueError("learner_logprobs, sampler_logprobs and mask must share one [B, T] shape")
    m = mask.bool()
    diff = (learner_logprobs.detach() - sampler_logprobs.detach()).nan_to_num(nan=0.0)
    diff = masked_fill_zero(diff, m)
    if level == "token":
        log_w = diff.clamp(-20.0, 20.0)
        unit = m
    elif level in ("sequence", "geometric"):
        total = diff.sum(-1, keepdim=True)
        if level == "geometric":
            total = total / m.sum(-1, keepdim=True).clamp(min=1).to(diff.dtype)
        log_w = total.clamp(-20.0, 20.0)
        unit = m.any(-1, keepdim=True)
    else:
        raise ValueError(
            f"Unknown importance-sampling level {level!r}. Valid names: geometric, sequence, token."
        )
    ratio = torch.exp(log_w)
    low = -torch.inf if clip_min is None else clip_min
    outside = (ratio > clip_max) | (ratio < low)
    if mode == "truncate":
        weights = ratio.clamp(min=clip_min, max=clip_max)
    elif mode == "mask":
        weights = torch.where(outside, torch.zeros_like(ratio), ratio)
    else:
        raise ValueError(f"Unknown importance-sampling mode {mode!r}. Valid names: mask, truncate.")
    weights = masked_fill_zero(weights, unit)
    n = unit.sum().clamp(min=1).to(ratio.dtype)
    w_sum = masked_sum(weights, unit)
    metrics = {
        "mean_ratio": masked_mean(ratio, unit),
        "max_ratio": torch.where(unit, ratio, torch.zeros_like(ratio)).max(),
        "min_ratio": torch.where(unit, ratio, torch.full_like(ratio, torch.inf)).min().nan_to_num(posinf=0.0),
        "clipped_frac": masked_mean(outside.to(ratio.dtype), unit),
        "mean_weight": masked_mean(weights, unit),
        "kl_k1": masked_mean(-diff, m),
        "kl_k3": masked_mean(torch.expm1(diff.clamp(-20, 20)) - diff, m),
        "ess": w_sum**2 / (n * masked_sum(weights**2, unit)).clamp(min=1e-30),
    }
    return ImportanceWeights(weights.detach(), metrics)
