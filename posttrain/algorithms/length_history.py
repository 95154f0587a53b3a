"""HAPO's history-aware length reward ("HAPO: Training Language Models to Reason Concisely via History-Aware
Policy Optimization", Huang, Zhang and Cardie, 2025, arXiv 2505.11225).

For every prompt x the trainer keeps a history state h(x): the minimum length, in completion tokens, over the
correct responses generated for x so far (``None`` before the first one). A response of length L gets the
length reward

    h(x) is None:   r_len = 0
    otherwise:      c = cos(min(pi/2 * L / h, pi))       (1 at L = 0, 0 at L = h, -1 at L >= 2h)
                    correct:     r_len = max(c, correct_floor)
                    incorrect:   r_len = min(c, 0)

and the reward trained on is ``correctness + w * r_len``. A correct response shorter than the shortest one
found so far earns a bonus, a longer one a penalty; an incorrect response is penalised for being long but
never rewarded for being short, so exploration is not pushed towards short wrong answers. After the step is
scored, h(x) <- min(h(x), the shortest correct response to x in the step).

``correct_floor`` is -0.7, as in the authors' code (``compute_len_reward``, github.com/HCY123902/HAPO): with
w <= 1 and a 0/1 correctness reward every correct response then outscores every incorrect one
(1 - 0.7 w > 0 >= 0 + w min(c, 0)). Set it to -1 for the unclipped cosine.

The length-reward shapes are registered in ``LENGTH_REWARDS`` (``cosine``: the paper's; ``linear``: the
piecewise-linear alternative of the authors' code, c = max(1 - L / h, -1)); each has the signature
``fn(lengths, correct, history, *, correct_floor) -> [B]``, with ``history`` NaN where h is None.
:class:`LengthHistory` is the per-prompt state (``min``, the paper's aggregate, or ``mean``, the running mean
of every correct length, the code's other mode), plain Python with ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from posttrain.algorithms.registry import LENGTH_REWARDS

AGGREGATES = ("min", "mean")


def _shaped(c: Tensor, correct: Tensor, history: Tensor, correct_floor: float) -> Tensor:
    """max(c, floor) for correct rows, min(c, 0) for incorrect ones, 0 where the history is None (NaN)."""
    if not -1.0 <= correct_floor <= 1.0:
        raise ValueError(f"correct_floor must lie in [-1, 1], got {correct_floor}")
    reward = torch.where(correct.bool(), c.clamp(min=correct_floor), c.clamp(max=0.0))
    return torch.where(torch.isnan(history), torch.zeros_like(reward), reward)


def _inputs(lengths: Tensor, correct: Tensor, history: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not (lengths.shape == correct.shape == history.shape) or lengths.dim() != 1:
        raise ValueError(f"lengths {tuple(lengths.shape)}, correct {tuple(correct.shape)} and history "
                         f"{tuple(history.shape)} must share one [B] shape")
    if (history[~torch.isnan(history)] <= 0).any():
        raise ValueError("a history state is a positive length (NaN: none yet)")
    lengths = lengths.to(torch.float64)
    history = history.to(torch.float64)
    # where h is None the ratio is never used; 1.0 keeps it finite
    ratio = lengths / torch.where(torch.isnan(history), torch.ones_like(history), history)
    return ratio, correct.bool(), history


@LENGTH_REWARDS.register("cosine")
def cosine_length_reward(lengths: Tensor, correct: Tensor, history: Tensor, *,
                         correct_floor: float = -0.7) -> Tensor:
    """HAPO's length reward [B]: c = cos(min(pi/2 * L / h, pi)); correct: max(c, correct_floor); incorrect:
    min(c, 0); 0 where h is None (NaN in ``history``). ``lengths`` [B] in tokens, ``correct`` [B] bool.
    ("HAPO: Training Language Models to Reason Concisely via History-Aware Policy Optimization", 2025.)"""
    ratio, correct, history = _inputs(lengths, correct, history)
    c = torch.cos(torch.clamp(ratio * (math.pi / 2), max=math.pi))
    return _shaped(c, correct, history, correct_floor)


@LENGTH_REWARDS.register("linear")
def linear_length_reward(lengths: Tensor, correct: Tensor, history: Tensor, *,
                         correct_floor: float = -0.7) -> Tensor:
    """The piecewise-linear shape of the HAPO authors' code (``type_lr: linear``, no tolerance band):
    c = max(1 - L / h, -1) (1 at L = 0, 0 at L = h, -1 at L >= 2h), then shaped as :func:`cosine_length_reward`.
    (HAPO, Huang et al., 2025.)"""
    ratio, correct, history = _inputs(lengths, correct, history)
    return _shaped(torch.clamp(1.0 - ratio, min=-1.0), correct, history, correct_floor)


def length_reward(name: str, lengths: Tensor, correct: Tensor, history: Tensor, **options: Any) -> Tensor:
    """The length reward [B] registered as ``name`` in ``LENGTH_REWARDS`` (float64, detached)."""
    fn = LENGTH_REWARDS.get(name)
    with torch.no_grad():
        return fn(lengths.detach(), correct.detach(), history.detach(), **options)


class LengthHistory:
    """HAPO's per-prompt history state h(x): the ``min`` (or ``mean``) length of the correct responses to x so
    far. Keys are prompt ids (str or int); a prompt with no correct response yet has no state (None)."""

    def __init__(self, *, aggregate: str = "min") -> None:
        if aggregate not in AGGREGATES:
            raise ValueError(f"Unknown aggregate {aggregate!r}. Valid names: {', '.join(AGGREGATES)}.")
        self.aggregate = aggregate
        self.state: dict[Hashable, float] = {}  # h(x)
        self.count: dict[Hashable, int] = {}  # correct responses folded into h(x)

    def get(self, key: Hashable) -> float | None:
        return self.state.get(key)

    def history(self, keys: Sequence[Hashable]) -> Tensor:
        """h(x) per key as a float64 [B] tensor, NaN where there is none yet."""
        return torch.tensor([self.state.get(key, math.nan) for key in keys], dtype=torch.float64)

    def update(self, keys: Sequence[Hashable], lengths: Tensor | Sequence[float],
               correct: Tensor | Sequence[bool]) -> None:
        """Fold one step's responses in: per prompt, the correct ones' lengths update h (min: the minimum of h and
        the step's shortest; mean: the running mean over all correct lengths). Incorrect responses leave it."""
        lengths = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1).tolist()
        correct = torch.as_tensor(correct).reshape(-1).bool().tolist()
        if not len(keys) == len(lengths) == len(correct):
            raise ValueError(f"need one length and one verdict per key: {len(keys)} keys, {len(lengths)} lengths, "
                             f"{len(correct)} verdicts")
        found: dict[Hashable, list[float]] = {}
        for key, length, ok in zip(keys, lengths, correct, strict=True):
            if ok:
                if not length > 0:
                    raise ValueError(f"a correct response's length must be positive, got {length} for {key!r}")
                found.setdefault(key, []).append(length)
        for key, values in found.items():
            old, seen = self.state.get(key), self.count.get(key, 0)
            if self.aggregate == "min":
                self.state[key] = min(values) if old is None else min(old, min(values))
            else:
                self.state[key] = (sum(values) + (old or 0.0) * seen) / (seen + len(values))
            self.count[key] = seen + len(values)

    def mean(self) -> float:
        """Mean of h over the tracked prompts (0.0 with none)."""
        return sum(self.state.values()) / len(self.state) if self.state else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"aggregate": self.aggregate, "state": dict(self.state), "count": dict(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        aggregate = state.get("aggregate", "min")
        if aggregate not in AGGREGATES:
            raise ValueError(f"Unknown aggregate {aggregate!r} in the saved length history.")
        self.aggregate = aggregate
        self.state = {k: float(v) for k, v in state["state"].items()}
        self.count = {k: int(v) for k, v in state.get("count", {}).items()}

    def __len__(self) -> int:
        return len(self.state)


__all__ = ["AGGREGATES", "LengthHistory", "cosine_length_reward", "length_reward", "linear_length_reward"]
