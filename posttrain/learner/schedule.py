"""Learning-rate schedules as multipliers of the peak rate (pure functions)."""

from __future__ import annotations

import math


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, kind: str, min_ratio: float = 0.0) -> float:
    """Linear warmup to 1, then ``constant``, ``linear`` or ``cosine`` decay to ``min_ratio``.

    ``step`` counts optimizer steps already taken (the rate used for step s+1).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        shape = 1.0 - progress
    elif kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return min_ratio + (1.0 - min_ratio) * shape
