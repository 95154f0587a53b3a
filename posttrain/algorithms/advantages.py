"""Advantage estimators.

Outcome estimators (one scalar reward per sequence) take rewards [B] laid out
group by group -- rows [0..G-1] are group 0 (G responses to the same prompt),
rows [G..2G-1] group 1, and so on -- and return advantages [B]. They are
registered in ``ADVANTAGE_ESTIMATORS`` and called through :func:`group_advantages`.
A NaN reward means "could not be scored": it is left out of every statistic and
its advantage is 0 (as TRL does for completions no reward function scored).

Token-level estimators (GAE, T-PPO's extended GAE, REINFORCE++ returns) take per-token rewards and a
mask [B, T] and are registered in ``TOKEN_ADVANTAGE_ESTIMATORS``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from posttrain.algorithms._masked import group_view, masked_fill_zero, masked_whiten
from posttrain.algorithms.registry import ADVANTAGE_ESTIMATORS, TOKEN_ADVANTAGE_ESTIMATORS


def _nanmean(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    valid = ~torch.isnan(x)
    total = torch.where(valid, x, torch.zeros_like(x))
    if dim is None:
        return total.sum() / valid.sum().clamp(min=1)
    return total.sum(dim, keepdim=keepdim) / valid.sum(dim, keepdim=keepdim).clamp(min=1)


def _nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False, unbiased: bool = True) -> Tensor:
    """Standard deviation ignoring NaNs; 0 when fewer than two values (a group with no spread)."""
    valid = ~torch.isnan(x)
    mean = _nanmean(x, dim, keepdim=True) if dim is not None else _nanmean(x)
    sq = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x))
    count = valid.sum() if dim is None else valid.sum(dim, keepdim=keepdim)
    total = sq.sum() if dim is None else sq.sum(dim, keepdim=keepdim)
    denom = (count - 1) if unbiased else count
    return torch.sqrt(total / denom.clamp(min=1))


def _finish(advantages: Tensor, rewards: Tensor) -> Tensor:
    # Unscorable rows carry no signal: zero advantage.
    return torch.where(torch.isnan(rewards), torch.zeros_like(advantages), advantages)


@ADVANTAGE_ESTIMATORS.register("grpo", needs=("batch_stats",))  # scale=batch
def grpo_advantages(rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """GRPO group normalisation: A_i = (r_i - mean_g(r)) / (std + eps), with std the unbiased standard
    deviation of the group (``scale="group"``, the paper), of the whole batch (``scale="batch"``,
    "Tricks or Traps? A Deep Dive into RL for LLM Reasoning", 2025), or no division (``scale="none"``).
    ("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", 2024.)

    eps is 1e-6 as in verl; TRL uses 1e-4.
    """
    groups = group_view(rewards, group_size)
    centred = (groups - _nanmean(groups, dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        std = _nanstd(groups, dim=1, keepdim=True).expand_as(groups).reshape(-1)
    elif scale == "batch":
        std = _nanstd(rewards).expand_as(rewards)
    elif scale == "none":
        return _finish(centred, rewards)
    else:
        raise ValueError(f"Unknown GRPO scale {scale!r}. Valid names: batch, group, none.")
    # A group with no spread has centred rewards of exactly 0: keep them 0 even when eps = 0.
    scaled = torch.where(std > 0, centred / (std + eps), centred / (1.0 + eps))
    return _finish(scaled, rewards)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO: A_i = r_i - mean_g(r), no std division (which biases towards too-easy and too-hard
    prompts). Pair with the ``seq-mean-token-sum-norm`` aggregation.
    ("Understanding R1-Zero-Like Training: A Critical Perspective", 2025.)"""
    return grpo_advantages(rewards, group_size, scale="none")


@ADVANTAGE_ESTIMATORS.register("rloo", needs=("batch_stats",))  # normalize=True
def rloo_advantages(
    rewards: Tensor, group_size: int, *, normalize: bool = False, eps: float = 1e-4
) -> Tensor:
    """RLOO: A_i = r_i - (1/(G-1)) sum_{j != i} r_j  (= G/(G-1) * (r_i - mean_g r)).
    ``normalize=True`` then whitens over the batch, (A - mean) / (std + eps), like TRL's
    ``normalize_advantages``. ("Back to Basics: Revisiting REINFORCE Style Optimization for Learning
    from Human Feedback in LLMs", 2024; "Buy 4 REINFORCE Samples, Get a Baseline for Free!", 2019.)"""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (group_size >= 2)")
    groups = group_view(rewards, group_size)
    valid = ~torch.isnan(groups)
    count = valid.sum(1, keepdim=True)
    total = torch.where(valid, groups, torch.zeros_like(groups)).sum(1, keepdim=True)
    baseline = (total - groups) / (count - 1).to(groups.dtype)
    adv = (groups - baseline).reshape(-1)
    # A group with a single scorable sample has no leave-one-out baseline.
    adv = torch.where((count.expand_as(groups) < 2).reshape(-1), torch.zeros_like(adv), adv)
    adv = _finish(adv, rewards)
    if normalize:
        scored = torch.where(torch.isnan(rewards), torch.full_like(adv, float("nan")), adv)
        adv = _finish((adv - _nanmean(scored)) / (_nanstd(scored) + eps), rewards)
    return adv


@ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline", needs=("batch_stats", "mask"))
def reinforce_pp_baseline_advantages(
    rewards: Tensor, group_size: int, *, mask: Tensor | None = None, eps: float = 1e-8
) -> Tensor:
    """REINFORCE++-baseline: A_i = r_i - mean_g(r), then whitened over the whole batch,
    (A - mean_B A) / sqrt(var_B A + eps). With ``mask`` [B, T], the batch statistics are token-weighted
    (each sequence counts once per response token), as in OpenRLHF and verl.
    ("REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models", 2025.)

    The whitening is over the batch given: under several ranks, gather the rewards first (the trainers do).
    """
    centred = grpo_advantages(rewards, group_size, scale="none")
    scored = ~torch.isnan(rewards)
    if mask is None:
        weights = scored.to(rewards.dtype)
    else:
        weights = mask.bool().sum(-1).to(rewards.dtype) * scored
    total = weights.sum().clamp(min=1e-12)
    mean = (weights * centred).sum() / total
    var = (weights * (centred - mean) ** 2).sum() / total
    return _finish((centred - mean) * torch.rsqrt(var + eps), rewards)


@ADVANTAGE_ESTIMATORS.register("bnpo", needs=("batch_stats",))
def bnpo_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    reward_min: float = 0.0,
    reward_max: float = 1.0,
    max_weight: float = 1e6,
) -> Tensor:
    """BNPO: A_i = (r_i - p) / f(p; a, b), p the group's mean (success rate) and f the Beta density with
    a = max(1 + alpha/3, 1), b = max(1 + beta/3, 1), where (alpha, beta) are the method-of-moments Beta
    fit to the batch's group means: alpha = (m(1-m)/v - 1) m, beta = (m(1-m)/v - 1)(1-m).
    Rewards are first mapped to [0, 1] by (r - reward_min) / (reward_max - reward_min); 1/f is capped at
    ``max_weight``. ("BNPO: Beta Normalization Policy Optimization", 2025.)"""
    if reward_max <= reward_min:
        raise ValueError("reward_max must be larger than reward_min")
    scaled = (rewards - reward_min) / (reward_max - reward_min)
    groups = group_view(scaled, group_size)
    if ((scaled < 0) | (scaled > 1)).any():
        raise ValueError("BNPO needs rewards within [reward_min, reward_max]")
    p = _nanmean(groups, dim=1)
    if p.numel() > 1:
        m, v = p.mean(), p.var()
    else:
        m, v = p.new_tensor(0.0), p.new_tensor(1.0)
    # All groups with the same success rate: no spread to fit; fall back to the uniform density.
    ratio = torch.where(v > 0, m * (1 - m) / v.clamp(min=1e-12) - 1, torch.zeros_like(v))
    a = torch.clamp(1 + ratio * m / 3, min=1.0)
    b = torch.clamp(1 + ratio * (1 - m) / 3, min=1.0)
    # log Beta density; xlogy makes 0 * log(0) = 0 so p in {0, 1} is finite when a = 1 or b = 1.
    log_norm = torch.lgamma(a + b) - torch.lgamma(a) - torch.lgamma(b)
    log_pdf = log_norm + torch.xlogy(a - 1, p) + torch.xlogy(b - 1, 1 - p)
    weight = torch.exp(-log_pdf).clamp(max=max_weight)
    adv = (groups - p.unsqueeze(1)) * weight.unsqueeze(1)
    return _finish(adv.reshape(-1), rewards)


@ADVANTAGE_ESTIMATORS.register("remax", needs=("baseline_rewards",))
def remax_advantages(rewards: Tensor, group_size: int = 1, *, baseline_rewards: Tensor) -> Tensor:
    """ReMax: A_i = r_i - r(greedy_i), the baseline being the reward of the greedy response to the same
    prompt. ``baseline_rewards`` [B] holds that reward per row (repeat it over each group).
    ("ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large
    Language Models", 2023.)"""
    group_view(rewards, group_size)
    if baseline_rewards.shape != rewards.shape:
        raise ValueError(
            f"baseline_rewards {tuple(baseline_rewards.shape)} must match rewards {tuple(rewards.shape)}"
        )
    return _finish(rewards - baseline_rewards, rewards)


@ADVANTAGE_ESTIMATORS.register("reinforce")
def reinforce_advantages(rewards: Tensor, group_size: int = 1) -> Tensor:
    """Plain REINFORCE: A_i = r_i (no baseline). ("Simple Statistical Gradient-Following Algorithms
    for Connectionist Reinforcement Learning", Williams, 1992.)"""
    group_view(rewards, group_size)
    return _finish(rewards.clone(), rewards)


@ADVANTAGE_ESTIMATORS.register("spo", needs=("batch_stats", "tracker", "keys"))
def spo_advantages(
    rewards: Tensor, group_size: int = 1, *, tracker: Any, keys: list, eps: float = 1e-8
) -> Tensor:
    """SPO: A_i = r_i - v(x_i) from a persistent per-prompt value tracker, normalised over the batch.
    ``tracker`` is a :class:`posttrain.algorithms.spo.SPOValueTracker`; ``keys`` the prompt ids of the rows.
    Does not update the tracker (call ``tracker.update`` after the step). ("Single-stream Policy
    Optimization", 2025.)"""
    group_view(rewards, group_size)
    return tracker.advantages(keys, rewards, eps=eps)


@ADVANTAGE_ESTIMATORS.register("oreal", needs=("batch_stats", "mask"))
def oreal_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    mask: Tensor | None = None,
    threshold: float = 0.5,
    baseline: str = "rloo",
    positive_advantage: bool = True,
    positive_weight: float = 1.0,
    negative_weight: float = 0.5,
    eps: float = 1e-8,
) -> Tensor:
    """OREAL's outcome advantages ("Exploring the Limit of Outcome Reward for Learning Mathematical Reasoning",
    Lyu et al., 2025, arXiv 2502.06781), for the ``oreal`` policy loss (behaviour cloning where A > 0).

    Rewards are binary outcomes: r = 1 if the reward exceeds ``threshold``, else 0 (NaN: unscored). With p_-i
    the pass rate of the other responses in i's group (``baseline="rloo"``, the released recipes' reward
    shaping):

        correct i:    A_i = 1 - p_-i        (its behaviour-cloning weight; 1 when ``positive_advantage=False``)
        incorrect i:  A_i = 0 - p_-i        (the reshaped reward of a negative: the more often the prompt is
                                             solved, the harder a failure is pushed down)

    ``baseline="grpo"`` uses (r - mean_g r) / (std_g r + eps) instead. Positives and negatives are then
    normalised separately, as the paper's loss averages each over its own tokens, and weighted by eta+ =
    ``positive_weight`` and eta- = ``negative_weight`` (1.0 and 0.5 in the released recipes):

        A_i <- A_i * eta+ * N / N+   (correct),    A_i <- A_i * eta- * N / N-   (incorrect)

    N+, N-, N: the response tokens of the correct, incorrect and all rows, from ``mask`` [B, T] (the trainer's
    gathered lengths; without it, rows are counted). So a ``token-mean`` loss over the step's N tokens gives
    eta+ * sum_{correct} A * loss_t / N+ + eta- * sum_{incorrect} A * loss_t / N-.
    """
    group_view(rewards, group_size)
    if baseline not in ("rloo", "grpo"):
        raise ValueError(f"Unknown OREAL baseline {baseline!r}. Valid names: grpo, rloo.")
    scored = ~torch.isnan(rewards)
    correct = scored & (rewards > threshold)
    negative = scored & ~correct
    binary = torch.where(scored, correct.to(rewards.dtype), rewards)
    if baseline == "rloo":
        adv = rloo_advantages(binary, group_size)
    else:
        adv = grpo_advantages(binary, group_size, eps=eps)
    if not positive_advantage:  # plain behaviour cloning: every correct response weighs 1
        adv = torch.where(correct, torch.ones_like(adv), adv)
    if mask is None:
        lengths = torch.ones_like(rewards)
    else:
        if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
            raise ValueError(f"mask must be [B, T] with B = {rewards.shape[0]}, got {tuple(mask.shape)}")
        lengths = mask.bool().sum(-1).to(rewards.dtype)
    total = lengths.sum()
    positive_scale = positive_weight * total / (lengths * correct).sum().clamp(min=1)
    negative_scale = negative_weight * total / (lengths * negative).sum().clamp(min=1)
    scale = torch.where(correct, positive_scale, torch.where(negative, negative_scale, torch.zeros_like(adv)))
    return _finish(adv * scale, rewards)


def group_advantages(estimator: str, rewards: Tensor, group_size: int, **kwargs: Any) -> Tensor:
    """Outcome-reward advantages [B] for rewards [B] laid out group by group (rows [0..G-1] are group 0).

    ``estimator`` is a name in ``ADVANTAGE_ESTIMATORS``: grpo (kwargs ``scale``, ``eps``), dr_grpo, rloo
    (``normalize``, ``eps``), reinforce_pp_baseline (``mask``, ``eps``), bnpo (``reward_min``,
    ``reward_max``, ``max_weight``), remax (``baseline_rewards``), reinforce, spo (``tracker``, ``keys``),
    oreal (``mask``, ``threshold``, ``baseline``, ``positive_advantage``, ``positive_weight``,
    ``negative_weight``).
    The result is detached: advantages are targets, not part of the graph.
    """
    fn = ADVANTAGE_ESTIMATORS.get(estimator)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    with torch.no_grad():
        return fn(rewards.detach(), group_size, **kwargs)


def _gae_scan(rewards: Tensor, vals: Tensor, m: Tensor, last_value: Tensor, gamma: float, lam: float) -> Tensor:
    """The GAE recursion from the end, skipping masked-out positions; ``last_value`` [B] is V after the last
    masked-in token (0 for a terminal state)."""
    next_value, next_adv = last_value, torch.zeros_like(vals[:, 0])
    out = torch.zeros_like(vals)
    for t in range(vals.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - vals[:, t]
        adv_t = delta + gamma * lam * next_adv
        on = m[:, t]
        next_value = torch.where(on, vals[:, t], next_value)
        next_adv = torch.where(on, adv_t, next_adv)
        out[:, t] = torch.where(on, adv_t, torch.zeros_like(adv_t))
    return out


@TOKEN_ADVANTAGE_ESTIMATORS.register("gae", needs=("values",))
def gae_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, returning (advantages, returns), both [B, T]:

        delta_t = r_t + gamma * V_{t'} - V_t,   A_t = delta_t + gamma * lam * A_{t'},   R_t = A_t + V_t

    where t' is the next masked-in position (masked-out positions in the middle, such as tool output,
    are skipped rather than treated as steps; after the last one V = 0). Not whitened: call
    :func:`masked_whiten` if you want it. ("High-Dimensional Continuous Control Using Generalized
    Advantage Estimation", Schulman et al., 2015.)"""
    if not (token_rewards.shape == values.shape == mask.shape):
        raise ValueError("token_rewards, values and mask must have the same shape [B, T]")
    m = mask.bool()
    rewards = masked_fill_zero(token_rewards, m).detach()
    vals = masked_fill_zero(values, m).detach()
    out = _gae_scan(rewards, vals, m, torch.zeros_like(vals[:, 0]), gamma, lam)
    return out, masked_fill_zero(out + vals, m)


@TOKEN_ADVANTAGE_ESTIMATORS.register("egae", needs=("values", "truncated", "bootstrap_values"))
def egae_advantages(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    truncated: Tensor,
    bootstrap_values: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Extended GAE (EGAE) of T-PPO, returning (advantages, returns), both [B, T]: GAE on responses that may
    be incomplete, i.e. cut by the generation window before they finished.

        delta_t = r_t + gamma * V_{t'} - V_t,   A_t = delta_t + gamma * lam * A_{t'},   R_t = A_t + V_t

    with t' the next masked-in position, as in :func:`gae_advantages`, except after the last one: there
    V = ``bootstrap_values[i]`` (V(s_T), the critic's value of the state after the last generated token) for
    a row with ``truncated[i]`` set, and V = 0 (a terminal state) for a finished row. So for an incomplete
    response of T tokens, A_t = sum_{k=0}^{T-t-1} (gamma lam)^k delta_{t+k} with
    delta_{T-1} = r_{T-1} + gamma V(s_T) - V(s_{T-1}): the cut is not treated as the end of the episode and
    the policy learns from the partial response. With no row truncated this is exactly GAE.

    ``truncated`` [B] bool; ``bootstrap_values`` [B] (read only where ``truncated``). Not whitened.
    ("Truncated Proximal Policy Optimization", Fan et al., 2025, arXiv:2506.15050, section 3.)"""
    if not (token_rewards.shape == values.shape == mask.shape):
        raise ValueError("token_rewards, values and mask must have the same shape [B, T]")
    rows = values.shape[0]
    if truncated.shape != (rows,) or bootstrap_values.shape != (rows,):
        raise ValueError(f"truncated and bootstrap_values must have shape [B] = ({rows},), got "
                         f"{tuple(truncated.shape)} and {tuple(bootstrap_values.shape)}")
    m = mask.bool()
    rewards = masked_fill_zero(token_rewards, m).detach()
    vals = masked_fill_zero(values, m).detach()
    cut = truncated.to(device=vals.device, dtype=torch.bool)
    boot = bootstrap_values.detach().to(device=vals.device, dtype=vals.dtype)
    next_value = torch.where(cut, boot, torch.zeros_like(boot))  # V after the last token: V(s_T) or terminal 0
    out = _gae_scan(rewards, vals, m, next_value, gamma, lam)
    return out, masked_fill_zero(out + vals, m)


@TOKEN_ADVANTAGE_ESTIMATORS.register("discounted_returns")
def discounted_returns(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    """G_t = sum_{k >= t} gamma^(k - t) r_k over masked-in positions (masked-out positions are skipped).
    Shape [B, T], zero outside the mask. (The REINFORCE return, "Simple Statistical Gradient-Following
    Algorithms for Connectionist Reinforcement Learning", Williams, 1992.)"""
    m = mask.bool()
    rewards = masked_fill_zero(token_rewards, m).detach()
    running = torch.zeros_like(rewards[:, 0])
    out = torch.zeros_like(rewards)
    for t in range(rewards.shape[1] - 1, -1, -1):
        candidate = rewards[:, t] + gamma * running
        running = torch.where(m[:, t], candidate, running)
        out[:, t] = torch.where(m[:, t], candidate, torch.zeros_like(candidate))
    return out


@TOKEN_ADVANTAGE_ESTIMATORS.register("reinforce_pp", needs=("batch_stats",))
def reinforce_pp_advantages(
    token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, eps: float = 1e-8,
    mean: float | Tensor | None = None, var: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: returns G_t (token rewards usually hold -coef * KL_t plus the outcome reward on the
    last token, see :func:`kl_penalized_rewards`), whitened over all tokens of the batch:
    A_t = (G_t - mean) / sqrt(var + eps). Returns (advantages, returns). ``mean`` / ``var`` replace the
    statistics of this batch, e.g. with those of the step's batch over every rank.
    ("REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models", 2025.)"""
    returns = discounted_returns(token_rewards, mask, gamma=gamma)
    return masked_whiten(returns, mask, eps=eps, mean=mean, var=var), returns


def broadcast_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence advantages [B] as a per-token tensor [B, T], zero outside the mask."""
    return masked_fill_zero(advantages.unsqueeze(-1).expand(mask.shape), mask)


def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """Per-row standard deviation of its group's rewards (NaN-aware), e.g. for logging degenerate groups."""
    groups = group_view(rewards, group_size)
    return _nanstd(groups, dim=1, keepdim=True).expand_as(groups).reshape(-1)


__all__ = [
    "bnpo_advantages",
    "broadcast_advantages",
    "discounted_returns",
    "dr_grpo_advantages",
    "egae_advantages",
    "gae_advantages",
    "group_advantages",
    "group_reward_std",
    "grpo_advantages",
    "oreal_advantages",
    "reinforce_advantages",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
    "spo_advantages",
]
