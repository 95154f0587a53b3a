"""SPO's single-stream value tracker ("Single-stream Policy Optimization", Xu and Ding, 2025).

Instead of sampling a group per prompt, SPO keeps a persistent Beta(alpha, beta) estimate of each
prompt's success rate and uses it as the baseline:

    v(x)   = alpha(x) / (alpha(x) + beta(x))
    A_i    = r_i - v(x_i),   then normalised over the whole batch: (A - mean_B A) / (std_B A + eps)
    update after the step:   alpha <- rho * alpha + r,   beta <- rho * beta + (1 - r)
    rho(x) = clip(2 ** (-D(x) / D_half), rho_min, rho_max)

D(x) is the divergence between the current policy and the one that last saw prompt x: the further the
policy has moved, the faster old evidence is forgotten. A prompt seen for the first time (or with no D
given) gets D = 0, i.e. rho = rho_max.

Where the paper measures D(x) directly (mean per token |log pi_now - log pi_then|), posttrain measures the
policy's movement once per step, on that step's own batch after its update (:meth:`advance` with
:func:`policy_divergence`), and takes D(x) as the movement summed over the steps since x was last seen
(:meth:`divergence`): an upper bound of the direct measure by the triangle inequality, at one extra
forward pass per step instead of keeping every prompt's old completions and log-probs.
Rewards are meant to lie in [0, 1]; for other rewards the update is a discounted running mean with
effective sample size alpha + beta.

The tracker also gives SPO's prioritised-sampling weights, sqrt(v (1 - v)) + epsilon.
It is plain Python state (dicts of floats) with ``state_dict``/``load_state_dict`` for checkpoints.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor


class SPOValueTracker:
    """Per-prompt KL-adaptive Beta value tracker. Keys are prompt ids (str or int)."""

    def __init__(
        self,
        *,
        rho_min: float = 0.875,
        rho_max: float = 0.96,
        d_half: float = 0.06,
        prior_alpha: float = 0.5,
        prior_beta: float = 0.5,
    ) -> None:
        if not 0.0 < rho_min <= rho_max <= 1.0:
            raise ValueError(f"need 0 < rho_min <= rho_max <= 1, got {rho_min}, {rho_max}")
        if d_half <= 0:
            raise ValueError("d_half must be positive")
        self.rho_min = float(rho_min)
        self.rho_max = float(rho_max)
        self.d_half = float(d_half)
        self.prior_alpha = float(prior_alpha)
        self.prior_beta = float(prior_beta)
        self.alpha: dict[Hashable, float] = {}
        self.beta: dict[Hashable, float] = {}
        self.num_updates: dict[Hashable, int] = {}
        self.movement = 0.0  # the policy's summed per-step divergence so far (advance)
        self.seen_at: dict[Hashable, float] = {}  # self.movement when each prompt was last folded in

    def advance(self, divergence: float) -> None:
        """Record that the policy moved by ``divergence`` (one step's :func:`policy_divergence`, averaged
        over the step's tokens on every rank)."""
        if not divergence >= 0:
            raise ValueError(f"a policy divergence is a non-negative number, got {divergence}")
        self.movement += float(divergence)

    def divergence(self, keys: Sequence[Hashable]) -> list[float]:
        """D(x) per key: the movement since x was last folded in (0 for a prompt never seen)."""
        return [self.movement - self.seen_at.get(key, self.movement) for key in keys]

    def initialize(self, key: Hashable, offline_rewards: Sequence[float]) -> None:
        """Set a prompt's prior from n offline samples of the initial policy with s successes:
        alpha0 = N0 (s + 0.5) / (n + 1), beta0 = N0 (n - s + 0.5) / (n + 1), N0 = 1 / (1 - rho_min),
        the effective sample size the tracker converges to at the fastest forgetting rate."""
        n = len(offline_rewards)
        s = float(sum(offline_rewards))
        n0 = 1.0 / (1.0 - self.rho_min) if self.rho_min < 1.0 else float(n)
        self.alpha[key] = n0 * (s + 0.5) / (n + 1)
        self.beta[key] = n0 * (n - s + 0.5) / (n + 1)

    def _ab(self, key: Hashable) -> tuple[float, float]:
        return self.alpha.get(key, self.prior_alpha), self.beta.get(key, self.prior_beta)

    def values(self, keys: Sequence[Hashable], *, like: Tensor | None = None) -> Tensor:
        """Current baselines v(x) = alpha / (alpha + beta) for ``keys``, as a [B] tensor."""
        out = []
        for key in keys:
            a, b = self._ab(key)
            out.append(a / (a + b))
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.float64
        device = like.device if like is not None else None
        return torch.tensor(out, dtype=dtype, device=device)

    def advantages(
        self, keys: Sequence[Hashable], rewards: Tensor, *, normalize: bool = True, eps: float = 1e-8
    ) -> Tensor:
        """A_i = r_i - v(x_i), normalised over the batch when ``normalize`` (the batch given: gather over
        ranks first). Reads the tracker before this step's update. Detached."""
        if rewards.dim() != 1 or rewards.shape[0] != len(keys):
            raise ValueError(
                f"need one reward per key: {len(keys)} keys, rewards of shape {tuple(rewards.shape)}"
            )
        rewards = rewards.detach()
        adv = rewards - self.values(keys, like=rewards)
        if normalize and adv.numel() > 1:
            adv = (adv - adv.mean()) / (adv.std() + eps)
        return adv

    def rho(self, divergence: Tensor | float | None) -> Tensor:
        """rho = clip(2 ** (-D / D_half), rho_min, rho_max)."""
        d = torch.as_tensor(0.0 if divergence is None else divergence, dtype=torch.float64)
        return torch.clamp(torch.pow(2.0, -d / self.d_half), self.rho_min, self.rho_max)

    def update(
        self, keys: Sequence[Hashable], rewards: Tensor, divergence: Tensor | Sequence[float] | None = None
    ) -> None:
        """Fold this step's rewards in: alpha <- rho alpha + r, beta <- rho beta + (1 - r), with rho from
        ``divergence`` D(x) per row (None: D = 0). Rows are applied in order, so a prompt that appears
        twice is discounted twice."""
        if rewards.shape[0] != len(keys):
            raise ValueError(f"need one reward per key: {len(keys)} keys, {rewards.shape[0]} rewards")
        r = rewards.detach().double().cpu().tolist()
        if divergence is None:
            rhos = [float(self.rho(None))] * len(keys)
        else:
            d = torch.as_tensor(divergence, dtype=torch.float64).reshape(-1).cpu()
            if d.numel() != len(keys):
                raise ValueError(f"need one divergence per key: {len(keys)} keys, {d.numel()} divergences")
            rhos = self.rho(d).tolist()
        for key, reward, rho in zip(keys, r, rhos, strict=True):
            a, b = self._ab(key)
            self.alpha[key] = rho * a + reward
            self.beta[key] = rho * b + (1.0 - reward)
            self.num_updates[key] = self.num_updates.get(key, 0) + 1
            self.seen_at[key] = self.movement

    def sampling_weights(self, keys: Sequence[Hashable], *, epsilon: float = 0.05) -> Tensor:
        """Prioritised sampling weights w(x) = sqrt(v (1 - v)) + epsilon (unnormalised)."""
        v = self.values(keys)
        return torch.sqrt((v * (1 - v)).clamp(min=0)) + epsilon

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": {
                "rho_min": self.rho_min,
                "rho_max": self.rho_max,
                "d_half": self.d_half,
                "prior_alpha": self.prior_alpha,
                "prior_beta": self.prior_beta,
            },
            "alpha": dict(self.alpha),
            "beta": dict(self.beta),
            "num_updates": dict(self.num_updates),
            "movement": self.movement,
            "seen_at": dict(self.seen_at),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        config = state["config"]
        self.rho_min = float(config["rho_min"])
        self.rho_max = float(config["rho_max"])
        self.d_half = float(config["d_half"])
        self.prior_alpha = float(config["prior_alpha"])
        self.prior_beta = float(config["prior_beta"])
        self.alpha = {k: float(v) for k, v in state["alpha"].items()}
        self.beta = {k: float(v) for k, v in state["beta"].items()}
        self.num_updates = {k: int(v) for k, v in state.get("num_updates", {}).items()}
        self.movement = float(state.get("movement", 0.0))
        self.seen_at = {k: float(v) for k, v in state.get("seen_at", {}).items()}

    def __len__(self) -> int:
        return len(self.alpha)


def policy_divergence(new_logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """D(x) per sequence for :meth:`SPOValueTracker.update`: mean over response tokens of
    |log pi_new - log pi_old| (as in the SPO recipe). Shape [B]."""
    diff = torch.where(mask.bool(), (new_logprobs - old_logprobs).abs(), torch.zeros_like(new_logprobs))
    return diff.sum(-1) / mask.bool().sum(-1).clamp(min=1).to(diff.dtype)
