"""Sample filters applied between scoring and the policy update.

- DAPO dynamic sampling drops groups whose responses all got the same reward: their group-relative
  advantages are zero, so they only dilute the batch.
- PF-PPO keeps the responses whose rewards are most reliable (the best and the worst, or the best and
  a random one) or reweights them by reward.

All functions return masks or weights over rows [B]; selecting rows (and refilling the batch, for
dynamic sampling) is the trainer's job.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms._masked import group_view


def dynamic_sampling_mask(rewards: Tensor, group_size: int, *, tol: float = 0.0) -> Tensor:
    """Keep mask [B] (bool): True for rows whose group has rewards that differ by more than ``tol``
    (max - min > tol), i.e. a non-zero GRPO advantage. NaN rewards are ignored.
    ("DAPO: An Open-Source LLM Reinforcement Learning System at Scale", 2025.)"""
    groups = group_view(rewards, group_size)
    valid = ~torch.isnan(groups)
    high = torch.where(valid, groups, torch.full_like(groups, -torch.inf)).max(1).values
    low = torch.where(valid, groups, torch.full_like(groups, torch.inf)).min(1).values
    keep = (valid.sum(1) >= 2) & ((high - low) > tol)
    return keep.unsqueeze(1).expand_as(groups).reshape(-1)


def pf_ppo_filter(
    rewards: Tensor,
    group_size: int,
    *,
    strategy: str = "best_worst",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Policy filtration: keep mask [B] choosing, in each group of responses to one prompt,
    ``best_worst`` (BW: highest and lowest reward), ``best_random`` (BR: highest plus one other at
    random, drawn with ``generator``) or ``best_of_n`` (BoN: highest only). Ties go to the first row.
    (PF-PPO, "Policy Filtration in RLHF to Fine-Tune LLM for Code Generation", 2024.)"""
    groups = group_view(rewards, group_size)
    filled_hi = torch.where(torch.isnan(groups), torch.full_like(groups, -torch.inf), groups)
    filled_lo = torch.where(torch.isnan(groups), torch.full_like(groups, torch.inf), groups)
    best = filled_hi.argmax(1)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    rows = torch.arange(groups.shape[0], device=groups.device)
    keep[rows, best] = True
    if strategy == "best_of_n":
        pass
    elif strategy == "best_worst":
        keep[rows, filled_lo.argmin(1)] = True
    elif strategy == "best_random":
        if group_size > 1:
            # A uniform draw among the other G - 1 rows: shift past the best one.
            offset = torch.randint(0, group_size - 1, (groups.shape[0],), generator=generator).to(best.device)
            other = torch.where(offset >= best, offset + 1, offset)
            keep[rows, other] = True
    else:
        raise ValueError(
            f"Unknown PF-PPO strategy {strategy!r}. Valid names: best_of_n, best_random, best_worst."
        )
    return keep.reshape(-1)


def pf_ppo_weights(rewards: Tensor, *, method: str = "pow", weight_pow: float = 2.0) -> Tensor:
    """PF-PPO reweighting of the whole batch (for resampling with ``torch.multinomial``):
    ``pow``: w = |r|^k; ``max_min``: 1 for the batch's highest and lowest reward, else 0;
    ``max_random``: 0.4 for the highest, 0.1 otherwise (verl's ``compute_pf_ppo_reweight_data``).
    A floor of 1e-8 keeps every weight positive."""
    if method == "pow":
        w = rewards.abs() ** weight_pow
    elif method == "max_min":
        w = ((rewards == rewards.max()) | (rewards == rewards.min())).to(rewards.dtype)
    elif method == "max_random":
        w = torch.where(rewards == rewards.max(), 0.4, 0.1).to(rewards.dtype)
    else:
        raise ValueError(f"Unknown PF-PPO reweight method {method!r}. Valid names: max_min, max_random, pow.")
    return (w + 1e-8).clamp(min=1e-8)
