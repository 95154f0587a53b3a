"""PPO's rewards, advantages and step statistics for one rollout batch (PPO-max and T-PPO), over every rank.

    s_i = clip((score_i - mu) / sigma, -c, c)       mu, sigma: running statistics of every score so far
    r_t = -beta * k(log pi_old(y_t), log pi_ref(y_t)) + [t = T_i] * s_i
    A   = GAE(r, V; gamma, lam), or T-PPO's extended GAE bootstrapped at V(s_T) for cut responses

Zheng et al., 2023 (PPO-max); Schulman et al., 2015 (GAE); Fan et al., 2025 (T-PPO, extended GAE).
"""

from __future__ import annotations

import torch

from posttrain import algorithms
from posttrain.distributed import all_reduce_sum
from posttrain.trainers import online


def incomplete_responses(truncated_enabled: bool, batch) -> torch.Tensor:
    """``[B]`` bool: with T-PPO on, the responses the generation window cut (finish_reason "length"); all False
    otherwise."""
    return torch.tensor([truncated_enabled and s.finish_reason == "length" for s in batch], dtype=torch.bool)


def value_lam(p) -> float:
    """Lambda of the critic's targets: T-PPO's ``truncated.value_lam`` (null: ``ppo.lam``), else ``ppo.lam``."""
    return p.truncated.value_lam if p.truncated.enabled and p.truncated.value_lam is not None else p.lam


def shape_scores(p, reward_stats, scores: torch.Tensor) -> torch.Tensor:
    """Scores normalised by the running statistics (``reward_stats``, updated with this step's over all ranks)
    and clipped; unscored samples get 0 (they are masked out of the losses)."""
    shaped = scores.double()
    if p.reward_norm:
        finite = shaped[torch.isfinite(shaped)]
        reward_stats.update_from_sums(*all_reduce_sum([float(finite.numel()), float(finite.sum()),
                                                       float((finite * finite).sum())]))
        shaped = algorithms.normalize_rewards(shaped, mean=reward_stats.mean, std=reward_stats.std, clip=p.reward_clip)
    elif p.reward_clip is not None:
        shaped = shaped.clamp(-p.reward_clip, p.reward_clip)
    return shaped.float().nan_to_num(0.0)


def advantages_and_returns(p, token_rewards: torch.Tensor, values: torch.Tensor, final_values: torch.Tensor,
                           loss_mask: torch.Tensor, incomplete: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, the critic's targets, the value loss's mask), ``[B, L]`` each.

    PPO: GAE, returns R_t = A_t + V_t, the value loss on every loss token. T-PPO: extended GAE (the incomplete
    rows bootstrapped from ``final_values``, V(s_T)); the value loss only on finished responses (an incomplete
    one's return would rest on the critic's own guess of V(s_T)), towards their lambda-``value_lam`` returns
    (GAE's, as EGAE equals GAE on finished rows); targets are 0 on the incomplete rows."""
    if not p.truncated.enabled:
        advantages, returns = algorithms.gae_advantages(token_rewards, values, loss_mask, gamma=p.gamma, lam=p.lam)
        return advantages, returns, loss_mask
    advantages, returns = algorithms.egae_advantages(token_rewards, values, loss_mask, truncated=incomplete,
                                                     bootstrap_values=final_values, gamma=p.gamma, lam=p.lam)
    value_mask = loss_mask * (~incomplete)[:, None].float()
    if value_lam(p) != p.lam:
        _, returns = algorithms.gae_advantages(token_rewards, values, value_mask, gamma=p.gamma, lam=value_lam(p))
    return advantages, returns * value_mask, value_mask


def whiten(p, advantages: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The advantages whitened over every rank's loss tokens (``ppo.whiten_advantages``), and their moments
    before whitening."""
    stats = online.global_moments(advantages, loss_mask)
    if not p.whiten_advantages:
        return advantages, stats
    return algorithms.masked_whiten(advantages, loss_mask, mean=stats["mean"], var=stats["var"]), stats


def truncation_metrics(window: int, scores: torch.Tensor, incomplete: torch.Tensor, final_values: torch.Tensor,
                       loss_mask: torch.Tensor, value_mask: torch.Tensor) -> dict[str, float]:
    """T-PPO's step metrics over every rank: the share of incomplete responses, the critic's mean V(s_T) on
    them, the share of loss tokens the value loss trains on, and the mean score of the finished responses."""
    finished = ~incomplete & torch.isfinite(scores)
    (cut, count, boot, loss_tokens, value_tokens, done, done_sum) = all_reduce_sum([
        float(incomplete.sum()), float(incomplete.numel()), float(final_values[incomplete].sum()),
        float(loss_mask.sum()), float(value_mask.sum()), float(finished.sum()), float(scores[finished].sum())])
    return {"tppo/window": float(window), "tppo/incomplete_share": cut / max(count, 1.0),
            "tppo/bootstrap_value_mean": boot / max(cut, 1.0),
            "tppo/value_token_share": value_tokens / max(loss_tokens, 1.0),
            "tppo/finished_reward_mean": done_sum / max(done, 1.0)}


def kl_and_shaped_means(token_kl: torch.Tensor, shaped: torch.Tensor, loss_mask: torch.Tensor
                        ) -> tuple[float, float, float]:
    """The mean sequence KL and shaped score over every rank's scored samples, and their count."""
    seq_kl = algorithms.masked_sum(token_kl, loss_mask, dim=-1)
    scored = loss_mask.sum(-1) > 0
    kl_sum, shaped_sum, seqs = all_reduce_sum([float(seq_kl[scored].sum()), float(shaped[scored].sum()),
                                               float(scored.sum())])
    return kl_sum / max(seqs, 1.0), shaped_sum / max(seqs, 1.0), seqs


def critic_metrics(advantage_stats: dict[str, float], returns: torch.Tensor, old_values: torch.Tensor,
                   loss_mask: torch.Tensor, value_mask: torch.Tensor) -> dict[str, float]:
    """Advantage moments, the mean return and value, and the explained variance 1 - Var(R - V) / Var(R): the
    share of the returns' variance the critic explains (1 is perfect), where it trains."""
    returns_stats = online.global_moments(returns, value_mask)
    residual = online.global_moments(returns - old_values, value_mask)
    value_stats = online.global_moments(old_values, loss_mask)
    return {"advantages/mean": advantage_stats["mean"], "advantages/std": advantage_stats["var"] ** 0.5,
            "advantages/min": advantage_stats["min"], "advantages/max": advantage_stats["max"],
            "returns/mean": returns_stats["mean"], "values/mean": value_stats["mean"],
            "explained_variance": 1.0 - residual["var"] / max(returns_stats["var"], 1e-12)}
