"""KL estimators, KL penalties (in the reward or in the loss) and KL coefficient controllers.

Estimators of KL(pi || pi_ref) from a sample y ~ pi, with log r = log pi_ref(y) - log pi(y)
("Approximating KL Divergence", J. Schulman, 2020):

- ``k1``: -log r = logp - ref_logp. Unbiased, high variance, can be negative.
- ``k2``: (log r)^2 / 2. Biased, low variance, always >= 0; its gradient is the gradient of KL.
- ``k3``: (r - 1) - log r. Unbiased, low variance, always >= 0.
- ``low_var_kl``: k3 with log r clamped to [-20, 20] and the result to [-10, 10] (verl's
  ``low_var_kl``), for numerical safety with far-off samples.
- ``k1+`` / ``k3+``: the value of k1 / k3 with the gradient of k2 (straight-through), since the
  expected gradient of k1 and k3 is not the gradient of the KL.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from posttrain.algorithms._masked import masked_fill_zero, masked_sum
from posttrain.algorithms.aggregation import aggregate_loss
from posttrain.algorithms.registry import KL_ESTIMATORS


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = logp - ref_logp  ("Approximating KL Divergence", J. Schulman, 2020)."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = 0.5 * (logp - ref_logp)^2  ("Approximating KL Divergence", J. Schulman, 2020)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1  ("Approximating KL Divergence", J. Schulman, 2020)."""
    log_r = ref_logprobs - logprobs
    # expm1 keeps precision when the two policies are close (log r ~ 0).
    return torch.expm1(log_r) - log_r


@KL_ESTIMATORS.register("low_var_kl")
def kl_low_var(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """low_var_kl = clamp(k3(clamp(ref_logp - logp, -20, 20)), -10, 10)  (k3 of "Approximating KL Divergence",
    J. Schulman, 2020, with verl's clamps)."""
    log_r = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.expm1(log_r) - log_r).clamp(-10.0, 10.0)


def _straight_through(value: Tensor, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    grad_carrier = kl_k2(logprobs, ref_logprobs)
    return grad_carrier - grad_carrier.detach() + value.detach()


@KL_ESTIMATORS.register("k1+")
def kl_k1_st(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Straight-through k1: k = k2 - sg(k2) + sg(k1), the value of k1 with the gradient of k2
    (estimators from "Approximating KL Divergence", J. Schulman, 2020)."""
    return _straight_through(kl_k1(logprobs, ref_logprobs), logprobs, ref_logprobs)


@KL_ESTIMATORS.register("k3+")
def kl_k3_st(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Straight-through k3: k = k2 - sg(k2) + sg(k3), the value of k3 with the gradient of k2
    (estimators from "Approximating KL Divergence", J. Schulman, 2020)."""
    return _straight_through(kl_k3(logprobs, ref_logprobs), logprobs, ref_logprobs)


def kl_estimate(kind: str, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref); ``kind`` in k1, k2, k3, low_var_kl, k1+, k3+
    ("Approximating KL Divergence", J. Schulman, 2020). Same shape as ``logprobs``."""
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ"
        )
    return KL_ESTIMATORS.get(kind)(logprobs, ref_logprobs)


def sequence_kl(kind: str, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence KL: sum_t m_t * k(logp_t, ref_logp_t). Shape [B]."""
    return masked_sum(kl_estimate(kind, logprobs, ref_logprobs), mask, dim=-1)


def kl_penalized_rewards(
    rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    coef: float | Tensor,
    kind: str = "k1",
) -> Tensor:
    """KL in the reward: token rewards r_t = -coef * k(logp_t, ref_t), plus the outcome reward at the
    last loss token of each sequence ("Fine-Tuning Language Models from Human Preferences", Ziegler et
    al., 2019; PPO-max, "Secrets of RLHF in Large Language Models Part I: PPO", 2023).

    ``rewards`` is either per sequence [B] (placed on the last masked-in token) or already per token
    [B, T] (added as is). Returns [B, T], zero outside the mask. The penalty is detached: it is a
    reward, not a loss term.
    """
    kl = kl_estimate(kind, logprobs, ref_logprobs).detach()
    token_rewards = -coef * kl
    m = mask.bool()
    if rewards.dim() == 1:
        if rewards.shape[0] != logprobs.shape[0]:
            raise ValueError(f"{rewards.shape[0]} rewards for {logprobs.shape[0]} sequences")
        positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)
        last = torch.where(m, positions, torch.full_like(positions, -1)).max(-1).values
        has_tokens = last >= 0
        outcome = torch.zeros_like(token_rewards)
        rows = torch.arange(m.shape[0], device=m.device)[has_tokens]
        outcome[rows, last[has_tokens]] = rewards[has_tokens].to(outcome.dtype)
        token_rewards = token_rewards + outcome
    elif rewards.shape == logprobs.shape:
        token_rewards = token_rewards + rewards
    else:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} fit neither [B] nor {tuple(logprobs.shape)}"
        )
    return masked_fill_zero(token_rewards, m)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kind: str = "k3",
    loss_agg_mode: str = "token-mean",
    **agg_kwargs: Any,
) -> Tensor:
    """KL in the loss (GRPO): L_KL = agg_t k(logp_t, ref_t), to be added as beta * L_KL
    ("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", 2024).
    ``agg_kwargs`` go to :func:`aggregate_loss` (global counts, norm_constant, gradient_divisor)."""
    return aggregate_loss(kl_estimate(kind, logprobs, ref_logprobs), mask, loss_agg_mode, **agg_kwargs)


class FixedKLController:
    """A constant KL coefficient, with the same interface as :class:`AdaptiveKLController`."""

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards ``target``:

        e = clip(KL / target - 1, -0.2, 0.2);   coef <- coef * (1 + e * n_steps / horizon)

    ("Fine-Tuning Language Models from Human Preferences", Ziegler et al., 2019; used by PPO-max in
    "Secrets of RLHF in Large Language Models Part I: PPO", 2023). ``n_steps`` is the number of
    samples (or steps) since the last update.
    """

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target ({target}) and horizon ({horizon}) must be positive")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


def make_kl_controller(
    kind: str, *, coef: float, target: float | None = None, horizon: float | None = None
) -> FixedKLController | AdaptiveKLController:
    """``kind`` "fixed" -> FixedKLController(coef); "adaptive" -> AdaptiveKLController(coef, target, horizon)."""
    if kind == "fixed":
        return FixedKLController(coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("an adaptive KL controller needs target and horizon")
        return AdaptiveKLController(coef, target, horizon)
    raise ValueError(f"Unknown KL controller {kind!r}. Valid names: adaptive, fixed.")
