"""Cutting and joining ``RolloutBatch``es: one engine's answer shared out to the ranks that asked for it.

A disaggregated run joins the batches of several rollout ranks and cuts the result into each learner's
share; a tensor-parallel generation group cuts the batch its engine produced for all of its ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

from posttrain.rollout.engine import RolloutBatch


def merge_batches(batches: Sequence[RolloutBatch], n: int) -> RolloutBatch:
    """Consecutive batches as one: group indices shifted by the prompts before them."""
    samples, offset = [], 0
    for batch in batches:
        for sample in batch.samples:
            sample.group += offset
            samples.append(sample)
        offset += batch.num_prompts
    seconds = max((b.seconds for b in batches), default=0.0)  # the engines generate side by side
    temperature = batches[0].temperature if batches else 1.0
    return RolloutBatch(samples, num_prompts=offset, n=n, seconds=seconds, temperature=temperature)


def split_batch(batch: RolloutBatch, counts: Sequence[int]) -> list[RolloutBatch]:
    """``batch`` cut into consecutive runs of ``counts`` prompts, groups renumbered from 0 in each."""
    parts, start = [], 0
    for count in counts:
        samples = [s for s in batch.samples if start <= s.group < start + count]
        for sample in samples:
            sample.group -= start
        parts.append(RolloutBatch(samples, num_prompts=count, n=batch.n, seconds=batch.seconds,
                                  temperature=batch.temperature))
        start += count
    return parts


def shares(total: int, parts: int) -> list[int]:
    """``total`` items in ``parts`` contiguous runs whose sizes differ by at most one."""
    return [total // parts + (i < total % parts) for i in range(parts)]
