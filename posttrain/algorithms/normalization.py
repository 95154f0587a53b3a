"""Reward normalisation: running moments of the reward stream, and normalise-then-clip.

PPO-max ("Secrets of RLHF in Large Language Models Part I: PPO", Zheng et al., 2023) scales every
reward by the statistics of all rewards seen so far and clips the result, which keeps the critic's
targets in a stable range as the policy (and with it the reward distribution) moves.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class RunningMoments:
    """Mean and (population) variance of every value seen so far, merged one batch at a time.

    A batch with count c, mean b and sum of squared deviations M_b merges into (n, mu, M) as

        delta = b - mu,   n' = n + c,   mu' = mu + delta * c / n',   M' = M + M_b + delta^2 * n * c / n'

    (the parallel form of Welford's algorithm: Chan, Golub & LeVeque, "Updating Formulae and a Pairwise
    Algorithm for Computing Sample Variances", 1979). ``update_from_sums`` takes a batch as
    (count, sum, sum of squares), which can be summed over ranks first so every rank holds the same state.
    """

    def __init__(self) -> None:
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count > 0 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, values: Tensor) -> None:
        """Merge the finite entries of ``values``."""
        x = values.detach().double().reshape(-1)
        x = x[torch.isfinite(x)]
        self.update_from_sums(float(x.numel()), float(x.sum()), float((x * x).sum()))

    def update_from_sums(self, count: float, total: float, total_sq: float) -> None:
        """Merge a batch given by its count, sum and sum of squares."""
        if count <= 0:
            return
        batch_mean = total / count
        batch_m2 = max(total_sq - count * batch_mean * batch_mean, 0.0)
        new_count = self.count + count
        delta = batch_mean - self.mean
        self.mean += delta * count / new_count
        self.m2 += batch_m2 + delta * delta * self.count * count / new_count
        self.count = new_count

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def normalize_rewards(rewards: Tensor, *, mean: float, std: float, clip: float | None = None,
                      shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """r' = clip((r - mean) / (std + eps), -clip, clip)  (``shift_mean=False``: r / (std + eps)).

    ``mean`` and ``std`` are the running statistics (:class:`RunningMoments`); ``clip=None`` does not clip.
    NaN rewards stay NaN. (PPO-max reward normalisation and clipping, "Secrets of RLHF in Large Language
    Models Part I: PPO", Zheng et al., 2023.)"""
    out = (rewards - mean if shift_mean else rewards) / (std + eps)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out


__all__ = ["RunningMoments", "normalize_rewards"]
