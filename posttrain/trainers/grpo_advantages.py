"""GRPO's advantages for one rollout step, computed on the step's whole batch gathered from every rank (in rank
order, the one-process order), so batch statistics are those of one process; each rank keeps its own rows.

  - ``sequence_advantages``: one advantage per sample from ``ADVANTAGE_ESTIMATORS`` (GRPO, Dr. GRPO, RLOO,
    REINFORCE++-baseline, BNPO, ReMax with its greedy baseline, SPO with its value tracker);
  - ``token_advantages``: [B, T] from ``TOKEN_ADVANTAGE_ESTIMATORS`` (REINFORCE++, discounted returns);
  - ``kl_in_reward``, ``samples_kept``: the KL penalty in the reward, the samples DAPO and PF-PPO keep;
  - ``advance_spo``: SPO's tracker after the step ("Single-stream Policy Optimization", Xu and Ding, 2025).
"""

from __future__ import annotations

import math

import torch

from posttrain import algorithms
from posttrain.distributed import all_gather_rows, all_reduce_max, all_reduce_sum, own_rows
from posttrain.trainers import online
from posttrain.trainers.grpo_config import GRPOSettings
from posttrain.trainers.online import PromptRow


def prompt_keys(rows: list[PromptRow], n: int) -> list[str]:
    """Each sample's prompt key (its data row), group-major: what SPO tracks a value for."""
    return [r.where for r in rows for _ in range(n)]


def sequence_advantages(g: GRPOSettings, rewards: torch.Tensor, n: int, mask: torch.Tensor, *, rank: int,
                        baseline_rewards: torch.Tensor | None = None, tracker=None,
                        keys: list[str] | None = None) -> torch.Tensor:
    """This rank's advantages [B] of ``g.estimator`` over the gathered batch: ``mask`` gives token-weighted
    estimators the response lengths, ``baseline_rewards`` is ReMax's greedy baseline, ``tracker`` / ``keys``
    SPO's value tracker and every rank's prompt keys."""
    needs = algorithms.ADVANTAGE_ESTIMATORS.needs(g.estimator)
    kwargs = dict(g.estimator_args)
    if "mask" in needs:  # token-weighted batch statistics: only the response lengths matter
        lengths = all_gather_rows(mask.sum(-1))
        kwargs["mask"] = torch.arange(int(lengths.max().item()) + 1)[None, :] < lengths[:, None]
    if "baseline_rewards" in needs:
        kwargs["baseline_rewards"] = all_gather_rows(baseline_rewards)
    if "tracker" in needs:
        kwargs.update(tracker=tracker, keys=keys)
    advantages = algorithms.group_advantages(g.estimator, all_gather_rows(rewards), n, **kwargs)
    return own_rows(advantages, rewards.shape[0], rank)


def token_advantages(g: GRPOSettings, rewards: torch.Tensor, old_logprobs, ref_logprobs,
                     mask: torch.Tensor) -> torch.Tensor:
    """Token-level advantages [B, T]: the sequence reward on the last completion token, minus kl_coef x the
    per-token KL with ``kl_in: reward`` (as REINFORCE++ and PPO place it), through the estimator; batch
    statistics (REINFORCE++'s whitening) are those of the step's batch over every rank. Unscored samples get
    no advantage."""
    scored = mask * torch.isfinite(rewards)[:, None].float()
    outcome = torch.nan_to_num(rewards, nan=0.0)
    if g.kl_coef and g.kl_in == "reward":
        token_rewards = algorithms.kl_penalized_rewards(outcome, old_logprobs, ref_logprobs, scored,
                                                        coef=g.kl_coef, kind=g.kl_estimator)
    else:
        zeros = torch.zeros_like(mask)
        token_rewards = algorithms.kl_penalized_rewards(outcome, zeros, zeros, scored, coef=0.0)
    kwargs = dict(g.estimator_args)
    if "batch_stats" in g.estimator_needs():  # whiten with the statistics of the whole step
        returns = algorithms.discounted_returns(token_rewards, scored, gamma=kwargs.get("gamma", 1.0))
        stats = online.global_moments(returns, scored)
        kwargs.update(mean=stats["mean"], var=stats["var"])
    out = algorithms.TOKEN_ADVANTAGE_ESTIMATORS.get(g.estimator)(token_rewards, scored, **kwargs)
    advantages = out[0] if isinstance(out, tuple) else out
    return advantages * scored


def advance_spo(tracker, keys: list[str], rewards: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                mask: torch.Tensor) -> dict[str, float]:
    """Fold the step's rewards into SPO's value tracker, identically on every rank (the gathered batch),
    discounted by how far the policy moved since each prompt was last seen; then record this step's movement:
    the policy divergence between this rank's log-probs ``before`` and ``after`` the update, token-weighted
    over every rank. Returns the tracker's metrics (``spo/rank_spread`` 0: every rank holds the same one)."""
    all_rewards = all_gather_rows(rewards)
    scored = [i for i, r in enumerate(all_rewards.tolist()) if math.isfinite(r)]
    seen = [keys[i] for i in scored]
    before_values = tracker.values(seen)
    tracker.update(seen, all_rewards[scored], divergence=tracker.divergence(seen))
    moved = algorithms.policy_divergence(after, before, mask) * mask.sum(-1)
    moved_sum, tokens = all_reduce_sum([float(moved.sum()), float(mask.sum())])
    tracker.advance(moved_sum / max(tokens, 1.0))
    after_values = tracker.values(seen)
    checksum = sum(tracker.alpha.values()) + sum(tracker.beta.values()) + tracker.movement
    high, neg_low = all_reduce_max([checksum, -checksum])
    return {"spo/tracked_prompts": float(len(tracker)), "spo/movement": tracker.movement,
            "spo/rank_spread": high + neg_low,
            "spo/value_mean": float(after_values.mean()) if scored else 0.0,
            "spo/value_change": float((after_values - before_values).abs().mean()) if scored else 0.0}


def baseline_metrics(baseline_rewards: torch.Tensor | None) -> dict[str, float]:
    """ReMax: the mean reward of the greedy baselines over every rank (``remax/baseline_reward``)."""
    if baseline_rewards is None:
        return {}
    finite = baseline_rewards[torch.isfinite(baseline_rewards)]
    total, scored = all_reduce_sum([float(finite.sum()), float(finite.numel())])
    return {"remax/baseline_reward": total / max(scored, 1.0)}


def kl_in_reward(g: GRPOSettings, rewards: torch.Tensor, old, ref, mask) -> tuple[torch.Tensor, float | None]:
    """With ``kl_in: reward``: the rewards minus kl_coef x each sample's KL, and the KL's mean over every rank
    (logged as ``kl``); else the rewards and None."""
    if not (g.kl_coef and g.kl_in == "reward"):
        return rewards, None
    penalty = algorithms.sequence_kl(g.kl_estimator, old, ref, mask)
    total, count = all_reduce_sum([float(penalty.sum()), float(len(penalty))])
    return rewards - g.kl_coef * penalty, total / max(count, 1.0)


def samples_kept(g: GRPOSettings, rewards: torch.Tensor, n: int, *, seed: int, step: int, rank: int) -> torch.Tensor:
    """The samples that train [B]: DAPO leaves out groups with identical rewards (take the rewards before any KL
    penalty); PF-PPO keeps the filtered ones (their advantages still come from the whole group)."""
    keep = algorithms.dynamic_sampling_mask(rewards, n) if g.dynamic_sampling else torch.ones(len(rewards), dtype=torch.bool)
    if g.pf_ppo != "off":
        keep &= online.policy_filtration_keep(g.pf_ppo, rewards, n, seed=seed, step=step, rank=rank)
    return keep
