"""Combination rules: per-reward score columns and weights -> one total per sample (pure functions).

For row ``i``, let ``K_i`` be the rewards whose score for the row is not ``None``:

  - ``sum``:       total_i = sum_{k in K_i} w_k * r_ki
  - ``mean``:      total_i = sum_{k in K_i} w_k * r_ki / sum_{k in K_i} |w_k|
                   (sum, then normalise by the weights that took part: a weighted mean)
  - ``normalize``: total_i = sum_{k in K_i} w_k * z_ki, with z_ki = (r_ki - mean_k) / (std_k + eps)
                   (normalise each reward, then sum), where mean_k and std_k (population std) are
                   taken over the non-None scores of reward k in the batch, or within the row's
                   group when groups are given (e.g. the completions of one GRPO prompt).

``total_i`` is ``None`` when ``K_i`` is empty (every reward abstained), and, for
``mean``, when the weights that took part sum to zero in absolute value.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

RULES = ("sum", "mean", "normalize")
EPS = 1e-6


def normalize_column(values: Sequence[float | None], groups: Sequence[Hashable] | None = None,
                     eps: float = EPS) -> list[float | None]:
    """Z-score a column over its non-None values (within each group if given); None stays None."""
    keys = list(groups) if groups is not None else [0] * len(values)
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} group ids for {len(values)} values")
    members: dict[Hashable, list[float]] = {}
    for key, value in zip(keys, values, strict=True):
        if value is not None:
            members.setdefault(key, []).append(value)
    stats = {}
    for key, vals in members.items():
        mean = math.fsum(vals) / len(vals)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / len(vals))
        stats[key] = (mean, std)
    out: list[float | None] = []
    for key, value in zip(keys, values, strict=True):
        if value is None:
            out.append(None)
        else:
            mean, std = stats[key]
            out.append((value - mean) / (std + eps))
    return out


def combine(columns: Sequence[Sequence[float | None]], weights: Sequence[float], rule: str = "sum",
            groups: Sequence[Hashable] | None = None) -> list[float | None]:
    """Totals per row from reward columns (one list per reward, all the same length) and weights."""
    if rule not in RULES:
        raise ValueError(f"unknown combination rule {rule!r}; expected one of {', '.join(RULES)}")
    if len(columns) != len(weights):
        raise ValueError(f"{len(columns)} reward columns but {len(weights)} weights")
    if not columns:
        return []
    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError("reward columns have different lengths")
    if rule == "normalize":
        columns = [normalize_column(c, groups) for c in columns]
    totals: list[float | None] = []
    for i in range(n):
        present = [(w, c[i]) for c, w in zip(columns, weights, strict=True) if c[i] is not None]
        if not present:
            totals.append(None)
            continue
        total = math.fsum(w * r for w, r in present)
        if rule == "mean":
            scale = math.fsum(abs(w) for w, _ in present)
            totals.append(total / scale if scale > 0 else None)
        else:
            totals.append(total)
    return totals


def _complete_rows(columns: Sequence[Sequence[float | None]]) -> list[int]:
    """Rows every column scored (a None anywhere drops the row)."""
    n = len(columns[0]) if columns else 0
    return [i for i in range(n) if all(c[i] is not None for c in columns)]


def ensemble_column(columns: Sequence[Sequence[float | None]], method: str = "mean", *,
                    uwo_coef: float = 0.5) -> list[float | None]:
    """One column from K ensemble members' columns (``posttrain.algorithms.ensemble_reward``: mean, wco, uwo),
    per row; None where any member did not score the row."""
    import torch

    from posttrain.algorithms import ensemble_reward

    rows = _complete_rows(columns)
    out: list[float | None] = [None] * (len(columns[0]) if columns else 0)
    if rows:
        members = torch.tensor([[c[i] for i in rows] for c in columns], dtype=torch.float64)
        for i, value in zip(rows, ensemble_reward(members, method, uwo_coef=uwo_coef).tolist(), strict=True):
            out[i] = value
    return out


def objective_totals(columns: Sequence[Sequence[float | None]], weights: Sequence[float], method: str, *,
                     temperature: float = 1.0, reduce_sum=None) -> list[float | None]:
    """Totals per row from K objectives (``posttrain.algorithms.combine_objectives``), each objective its column
    times its weight: weighted_sum gives sum_k w_k r_k, min / softmin / maxmin act on the w_k r_k. A row any
    objective left unscored gets None. ``reduce_sum`` (a list of floats -> their sums over ranks) makes the
    batch statistics of maxmin those of the whole step; it is called even on an empty batch (a collective)."""
    import torch

    from posttrain.algorithms import OBJECTIVE_COMBINATIONS, combine_objectives

    if len(columns) != len(weights):
        raise ValueError(f"{len(columns)} objective columns but {len(weights)} weights")
    rows = _complete_rows(columns)
    k = len(columns)
    scaled = torch.tensor([[w * c[i] for c, w in zip(columns, weights, strict=True)] for i in rows],
                          dtype=torch.float64).reshape(len(rows), k)
    batch_means = None
    if "batch_means" in OBJECTIVE_COMBINATIONS.needs(method):
        sums = [float(v) for v in scaled.sum(0).tolist()] + [float(len(rows))]
        if reduce_sum is not None:
            sums = reduce_sum(sums)
        batch_means = torch.tensor(sums[:k], dtype=torch.float64) / max(sums[k], 1.0)
    out: list[float | None] = [None] * (len(columns[0]) if columns else 0)
    if rows:
        totals = combine_objectives(scaled, method, weights=[1.0] * k, temperature=temperature,
                                    batch_means=batch_means)
        for i, value in zip(rows, totals.tolist(), strict=True):
            out[i] = value
    return out
