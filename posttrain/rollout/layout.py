"""The inference layout: which ranks form which tensor-parallel engine, and whether a layout can work.

With ``rollout.tensor_parallel_size`` T, consecutive runs of T engine ranks form one vLLM engine (a
*generation group*); the engines are data-parallel to each other.

- Colocated, over a world of W ranks: W / T groups; group g is ranks ``g*T .. g*T + T-1``. Every rank of a
  group submits the group's prompts and gets the same samples back; each rank then trains on its own slice.
- Disaggregated, over R rollout ranks (the last R of the world): R / T engines, numbered the same way
  within the rollout ranks.

``check_layout`` rejects the impossible ones before any process starts, naming the numbers and what would
fit. vLLM shards attention heads and the MLP's intermediate dimension over T (KV heads too, or replicates
them when there are fewer KV heads than shards), and splits the vocabulary over T for the embedding and the
output head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """``engine_ranks`` ranks that host engine shards, grouped ``tensor_parallel_size`` at a time."""

    engine_ranks: int
    tensor_parallel_size: int

    @property
    def engines(self) -> int:
        return self.engine_ranks // self.tensor_parallel_size

    def engine_of(self, rank: int) -> int:
        """The engine (generation group) that engine rank ``rank`` is a shard of."""
        return rank // self.tensor_parallel_size

    def members(self, engine: int) -> list[int]:
        """Engine ranks of one engine, in shard order."""
        first = engine * self.tensor_parallel_size
        return list(range(first, first + self.tensor_parallel_size))


def _divisors(number: int, limit: int) -> list[int]:
    return [d for d in range(1, limit + 1) if number % d == 0]


def check_layout(rollout, model_path: str | Path | None, world_size: int, source: str = "the recipe") -> Layout:
    """The engine layout of an online run over ``world_size`` processes; a ``ConfigError`` when it cannot work.

    ``rollout``: the recipe's ``RolloutConfig``; ``model_path``: the checkpoint the engine serves (its
    ``config.json`` gives the head and vocabulary counts; skipped when there is none to read).
    """
    tp = rollout.tensor_parallel_size
    key = "rollout.tensor_parallel_size"
    if rollout.placement == "disaggregated":
        ranks, what = rollout.ranks, f"rollout.ranks ({rollout.ranks})"
    else:
        ranks, what = world_size, f"the number of processes ({world_size})"
    if tp > 1 and ranks % tp:
        fits = [d for d in _divisors(ranks, ranks) if d > 1] or [1]
        raise ConfigError(f"{key} ({tp}) in {source} must divide {what}: every engine takes {tp} whole ranks.",
                          hint=f"Use {key} in {fits}, or run {ranks + tp - ranks % tp} engine ranks.")
    layout = Layout(ranks, tp)
    if tp == 1 or model_path is None:
        return layout
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return layout
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)  # multimodal checkpoints nest the language model's
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    sizes = [("attention heads", "num_attention_heads", heads),
             ("the vocabulary", "vocab_size", config.get("vocab_size")),
             ("the MLP's intermediate size", "intermediate_size", config.get("intermediate_size"))]
    for label, field, value in sizes:
        if isinstance(value, int) and value % tp:
            fits = [d for d in _divisors(value, ranks) if d > 1] or [1]
            raise ConfigError(f"{key} ({tp}) in {source} must divide {label} of {model_path} ({field}={value}): "
                              "vLLM splits them evenly over the shards of an engine.",
                              hint=f"Use {key} in {fits}.")
    if isinstance(kv_heads, int) and kv_heads % tp and tp % kv_heads:
        fits = [d for d in range(2, ranks + 1) if ranks % d == 0 and (kv_heads % d == 0 or d % kv_heads == 0)
                and isinstance(heads, int) and heads % d == 0] or [1]
        raise ConfigError(f"{key} ({tp}) in {source} and the {kv_heads} KV heads of {model_path} "
                          "(num_key_value_heads) must divide one another: vLLM shards KV heads, or replicates them "
                          "when there are fewer than shards.", hint=f"Use {key} in {fits}.")
    return layout
