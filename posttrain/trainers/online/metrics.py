"""A rollout step's metrics, reduced over ranks (pure functions of the step's tensors and every rank's sums)."""

from __future__ import annotations

import math

import torch

from posttrain.distributed import all_reduce_max, all_reduce_sum


def global_moments(x: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean, population variance, min and max of the masked entries over every rank."""
    values = x.detach()[mask.bool()].double()
    count, total, total_sq = all_reduce_sum([float(values.numel()), float(values.sum()), float((values * values).sum())])
    high, neg_low = all_reduce_max([float(values.max()) if values.numel() else -float("inf"),
                                    float(-values.min()) if values.numel() else -float("inf")])
    mean = total / max(count, 1.0)
    return {"mean": mean, "var": max(total_sq / max(count, 1.0) - mean * mean, 0.0), "min": -neg_low, "max": high,
            "count": count}


def rollout_metrics(batch, rewards: torch.Tensor, scores, drift: dict, sync, timings: dict[str, float],
                    verifier: str | None = None) -> dict[str, float]:
    """The metrics every online recipe logs for a step, reduced over ranks: rewards (combined and per reward),
    completion lengths and truncation, sampler-vs-learner drift, sync and timings; with a ``verifier`` (the
    label of a pass/fail reward), ``accuracy``: the share of its scored samples with a score of at least 1."""
    finite = rewards[torch.isfinite(rewards)]
    lengths = [len(s.completion_ids) for s in batch]
    truncated = sum(s.finish_reason == "length" for s in batch)
    empty = sum(not s.text.strip() for s in batch)  # scored like any text; usually 0 reward, kept in the loss
    labels = sorted(scores.scores)  # the same reward set, so the same labels, on every rank
    per_reward = []
    for label in labels:
        values = [v for v in scores.scores[label] if v is not None and math.isfinite(v)]
        per_reward += [float(sum(values)), float(len(values))]
    column = scores.scores.get(verifier, []) if verifier is not None else []
    verdicts = [float(v >= 1.0) for v in column if v is not None and math.isfinite(v)]
    sums = all_reduce_sum([finite.sum().item(), float(finite.numel()), float((finite * finite).sum().item()),
                           float(sum(lengths)), float(len(batch)), float(truncated), float(len(scores.issues)),
                           float(sum(verdicts)), float(len(verdicts)), float(empty), *per_reward])
    r_sum, r_count, r_sq, len_sum, count, trunc, issues, a_sum, a_count, empty = sums[:10]
    mean = r_sum / max(r_count, 1)
    metrics = {
        "reward/mean": mean, "reward/std": math.sqrt(max(r_sq / max(r_count, 1) - mean * mean, 0.0)),
        "reward/unscored": count - r_count, "reward/issues": issues,
        **{f"reward/{label}": total / n for label, total, n in zip(labels, sums[10::2], sums[11::2]) if n > 0},
        "completion_tokens": len_sum / max(count, 1), "completion/truncated_share": trunc / max(count, 1),
        "completion/empty_share": empty / max(count, 1),
        **{f"drift/{k}": v for k, v in reduce_drift(drift).items()}, **sync.as_metrics(),
        **{f"time/{k}_s": v for k, v in timings.items()},
        "time/samples_per_s": count / max(timings["step"], 1e-9),
        "time/sync_share": timings["sync"] / max(timings["step"], 1e-9),
    }
    if verifier is not None:
        metrics["accuracy"] = a_sum / max(a_count, 1)
    return metrics


def reduce_drift(drift: dict) -> dict[str, float]:
    """Per-rank drift statistics (``drift_stats``, plus TIS metrics) over every rank: ``tokens`` summed,
    ``*_max`` maximised, the rest token-weighted means."""
    keys = sorted(k for k in drift if k != "tokens")
    tokens = float(drift.get("tokens", 0))
    maxima = [k for k in keys if k.endswith("_max")]
    means = [k for k in keys if k not in maxima]
    summed = all_reduce_sum([tokens] + [float(drift[k]) * tokens for k in means])
    top = all_reduce_max([float(drift[k]) if tokens else -math.inf for k in maxima]) if maxima else []
    out = {k: v / max(summed[0], 1.0) for k, v in zip(means, summed[1:])}
    out.update({k: (v if math.isfinite(v) else 0.0) for k, v in zip(maxima, top)})
    out["tokens"] = summed[0]
    return out
