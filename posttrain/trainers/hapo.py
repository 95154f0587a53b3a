"""HAPO in the GRPO trainer (``grpo.hapo``): the history-aware length reward added to each step's rewards.

"HAPO: Training Language Models to Reason Concisely via History-Aware Policy Optimization" (Huang, Zhang and
Cardie, 2025, arXiv 2505.11225); the math is in ``posttrain.algorithms.length_history``. Per step:

  1. every rank gathers the step's prompt keys, completion lengths (tokens) and verdicts (the correctness
     reward's score >= 1) from every rank, in rank order (the one-process order);
  2. each response's length reward is read from the history as it was before the step, and this rank's rows
     get ``reward + weight * r_len``;
  3. the history takes the step's correct responses, from the gathered batch, so every rank holds the same one.

The history is saved in ``trainer_state.json`` (``hapo``) with every checkpoint and restored by
``resume=auto``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from posttrain.algorithms import LENGTH_REWARDS, LengthHistory, length_reward
from posttrain.config.schema import ConfigError, doc
from posttrain.distributed import DistInfo, all_gather_objects, all_gather_rows, all_reduce_max, own_rows


@dataclass
class HAPOSettings:
    """HAPO's history-aware length reward (docs/rl.md). Per prompt, h = the shortest correct response so far;
    a response of L tokens gets c = cos(min(pi/2 L / h, pi)): correct max(c, correct_floor), incorrect
    min(c, 0), 0 while h is None; the trained reward is the run's rewards + weight x that."""

    enabled: bool = doc(False, "Add HAPO's history-aware length reward to the rewards.")
    weight: float = doc(1.0, "w: reward + w x length reward (the paper's 1.0; keep w <= 1 so any correct response outscores any incorrect one).")
    length_reward: str = doc("cosine", "The length-reward shape (LENGTH_REWARDS): cosine (the paper's) or linear (the authors' code's alternative).")
    correct_floor: float = doc(-0.7, "Lowest length reward of a correct response (-0.7 in the authors' code; -1: the plain cosine).")
    aggregate: Literal["min", "mean"] = doc("min", "History state per prompt: the minimum length of its correct responses so far (the paper's), or their mean.")
    correctness_reward: str | None = doc(None, "Label of the pass/fail reward whose score >= 1 marks a response correct; default: the run's verifier (math_verify or unit_test).")

    def check(self, key: str, source: str) -> None:
        """A ``ConfigError`` naming ``key`` for settings that cannot work (only when enabled)."""
        if not self.enabled:
            return
        if self.length_reward not in LENGTH_REWARDS:
            raise ConfigError(f"{key}.length_reward in {source}: {LENGTH_REWARDS.unknown_message(self.length_reward)}")
        if not self.weight >= 0:
            raise ConfigError(f"{key}.weight in {source} must be at least 0, got {self.weight}.")
        if not -1.0 <= self.correct_floor <= 1.0:
            raise ConfigError(f"{key}.correct_floor in {source} must lie in [-1, 1], got {self.correct_floor}.")


class HAPOShaping:
    """The trainer's side of HAPO: the per-prompt history, and the step's shaped rewards and metrics."""

    def __init__(self, settings: HAPOSettings, labels: list[str], verifier: str | None, dist: DistInfo,
                 key: str = "grpo.hapo") -> None:
        self.settings, self.dist = settings, dist
        label = settings.correctness_reward or verifier
        if label is None:
            raise ConfigError(f"{key} needs a pass/fail reward to tell correct responses, and none of this run's "
                              f"rewards ({', '.join(labels)}) is a verifier; name its label in "
                              f"{key}.correctness_reward.")
        if label not in labels:
            raise ConfigError(f"{key}.correctness_reward: {label!r} is not the label of one of this run's rewards "
                              f"({', '.join(labels)}).")
        self.label = label
        self.history = LengthHistory(aggregate=settings.aggregate)

    def shape(self, rows: list, batch, rewards: torch.Tensor, scores) -> tuple[torch.Tensor, dict[str, float]]:
        """This rank's rewards plus ``weight`` x the length reward, and the ``hapo/*`` metrics; then the history
        takes the step's correct responses (gathered from every rank, so every rank updates alike)."""
        s = self.settings
        verdicts = scores.scores[self.label]
        keys = all_gather_objects([rows[sample.group].where for sample in batch])
        lengths = all_gather_rows(torch.tensor([float(len(sample.completion_ids)) for sample in batch],
                                               dtype=torch.float64))
        correct = all_gather_rows(torch.tensor([float(v is not None and math.isfinite(v) and v >= 1.0)
                                                for v in verdicts], dtype=torch.float64)).bool()
        totals = all_gather_rows(rewards.to(torch.float64))
        bonus = length_reward(s.length_reward, lengths, correct, self.history.history(keys),
                              correct_floor=s.correct_floor)
        shaped = rewards + s.weight * own_rows(bonus, len(batch), self.dist.rank).to(rewards.dtype)
        self.history.update(keys, lengths, correct)
        scored = torch.isfinite(totals)
        checksum = sum(self.history.state.values()) + sum(self.history.count.values())
        high, neg_low = all_reduce_max([checksum, -checksum])
        return shaped, {
            "hapo/length_reward": float(bonus[scored].mean()) if scored.any() else 0.0,
            "hapo/tracked_prompts": float(len(self.history)),
            "hapo/history_mean": self.history.mean(),
            "hapo/correct_share": float(correct.double().mean()) if len(correct) else 0.0,
            "hapo/rank_spread": high + neg_low,  # 0: every rank holds the same history
        }

    def state_dict(self) -> dict[str, Any]:
        return self.history.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state)
