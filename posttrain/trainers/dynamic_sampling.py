"""DAPO's dynamic sampling with refill: sample more groups until a step holds enough informative ones.

A group whose rewards are all equal has zero group-relative advantage and carries no gradient. DAPO
("DAPO: An Open-Source LLM Reinforcement Learning System at Scale", Yu et al., 2025, section 3.2) keeps
sampling until the batch is filled with groups whose accuracy is neither 0 nor 1, then trains on exactly
that many. Here:

- round 0 is the step's own prompts; each further round draws ``prompts_per_step`` fresh prompts (seeded by
  the run seed, the step and the round, so 1 or N ranks and a resumed run draw the same ones), split over
  the ranks like any step;
- after every round each rank all-gathers the scored groups; the informative ones are taken in global
  order (round, then rank, then prompt) until ``prompts_per_step`` are found or ``max_rounds`` extra rounds
  were spent;
- a step still short after the cap is filled with uninformative groups of round 0, which stay masked out
  of the loss (counted as ``dynamic_sampling/padded_groups``); then every rank takes its contiguous share.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.distributed import all_gather_objects


@dataclass
class ScoredGroup:
    """One prompt's n samples with their rewards, as they travel between ranks."""

    row: object  # PromptRow
    samples: list  # Sample, with .group reset on arrival
    rewards: list[float]  # combined reward per sample (NaN: unscored)
    scores: dict[str, list]  # reward label -> per-sample score
    issues: list

    @property
    def informative(self) -> bool:
        """At least two scored samples whose rewards differ: a non-zero group-relative advantage."""
        scored = [r for r in self.rewards if math.isfinite(r)]
        return len(scored) >= 2 and max(scored) > min(scored)


def split_groups(rows: list, batch, rewards: torch.Tensor, scores) -> list[ScoredGroup]:
    """The groups of one scored ``RolloutBatch`` (group-major, ``batch.n`` per group)."""
    n = batch.n
    values = rewards.tolist()
    groups = []
    for g, row in enumerate(rows):
        span = range(g * n, (g + 1) * n)
        issues = [i for i in scores.issues if i.row in span]
        groups.append(ScoredGroup(row, [batch[i] for i in span], [values[i] for i in span],
                                  {label: [column[i] for i in span] for label, column in scores.scores.items()},
                                  issues))
    return groups


def join_groups(groups: list[ScoredGroup], like_batch):
    """``(rows, RolloutBatch, rewards [B], BatchScores)`` of ``groups``, renumbered from 0."""
    from dataclasses import replace

    from reward_models.reward_set import BatchScores

    samples = [replace(s, group=g) for g, group in enumerate(groups) for s in group.samples]
    batch = replace(like_batch, samples=samples, num_prompts=len(groups))
    rewards = torch.tensor([r for group in groups for r in group.rewards], dtype=torch.float32)
    labels = sorted({label for group in groups for label in group.scores})
    scores = BatchScores(totals=[None if math.isnan(r) else r for r in rewards.tolist()],
                         scores={label: [v for group in groups for v in group.scores.get(label, [None] * len(group.samples))]
                                 for label in labels},
                         info=[{} for _ in samples], issues=[i for group in groups for i in group.issues],
                         row_ids=list(range(len(samples))))
    return [group.row for group in groups], batch, rewards, scores


def refill_prompt_ids(num_prompts: int, prompts_per_step: int, *, seed: int, step: int, round_: int) -> list[int]:
    """The global prompt ids of refill round ``round_`` (>= 1) of ``step``: a seeded draw without replacement
    (with replacement when the dataset is smaller than a step)."""
    rng = random.Random(f"posttrain-refill/{seed}/{step}/{round_}")
    if num_prompts >= prompts_per_step:
        return rng.sample(range(num_prompts), prompts_per_step)
    return [rng.randrange(num_prompts) for _ in range(prompts_per_step)]


def fill_with_informative_groups(first: list[ScoredGroup], more_round: Callable[[int], list[ScoredGroup]], *,
                                 target: int, max_rounds: int, rank: int, world_size: int):
    """This rank's share of ``target`` groups, informative ones first; and the metrics.

    ``first``: this rank's scored groups of the step; ``more_round(k)``: this rank's scored groups of refill
    round k (collective: every rank calls it for the same k)."""
    everyone = all_gather_objects(first)
    chosen = [g for g in everyone if g.informative]
    rounds = 0
    while len(chosen) < target and rounds < max_rounds:
        rounds += 1
        chosen += [g for g in all_gather_objects(more_round(rounds)) if g.informative]
    found = len(chosen)
    chosen = chosen[:target]
    padded = target - len(chosen)
    chosen += [g for g in everyone if not g.informative][:padded]
    share = target // world_size
    metrics = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/generated_groups": float(len(everyone) * (rounds + 1)),
               "dynamic_sampling/informative_groups": float(found), "dynamic_sampling/padded_groups": float(padded)}
    return chosen[rank * share : (rank + 1) * share], metrics


def refill(rollouts, settings, dist, step: int, timer, rows, batch, rewards: torch.Tensor, scores):
    """A step's rows, batch, rewards and scores after dynamic sampling's refill rounds, and its metrics; the
    step as it came when ``settings`` (``grpo:``) has no refill. Timed as ``generate``: the rounds' generation
    and scoring."""
    if not (settings.dynamic_sampling and settings.dynamic_sampling_max_rounds > 0):
        return rows, batch, rewards, scores, {}

    def more_round(round_: int) -> list[ScoredGroup]:
        extra_rows = rollouts.refill_rows(step, round_)
        extra = rollouts.generate_refill(step, round_, extra_rows)
        extra_rewards, extra_scores = rollouts.score(extra_rows, extra)
        return split_groups(extra_rows, extra, extra_rewards, extra_scores)

    with timer.stage("generate"):
        mine, metrics = fill_with_informative_groups(
            split_groups(rows, batch, rewards, scores), more_round, target=settings.prompts_per_step,
            max_rounds=settings.dynamic_sampling_max_rounds, rank=dist.rank, world_size=dist.world_size)
    return (*join_groups(mine, batch), metrics)
