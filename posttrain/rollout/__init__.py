"""Rollouts: a vLLM engine in the learner's process, weight sync into it, and log-prob checks.

Importing this package does not import vLLM; ``RolloutEngine`` does, when created.
"""

from posttrain.learner.logprobs import drift_stats, token_entropy, token_logprobs
from posttrain.rollout.config import RolloutConfig
from posttrain.rollout.engine import Prompt, RolloutBatch, RolloutEngine, Sample
from posttrain.rollout.protocol import AdapterEngine, Engine
from posttrain.rollout.sync import (
    SyncStats,
    adapter_sync_problem,
    iter_adapter_tensors,
    iter_checkpoint_tensors,
    resolve_lora_sync,
    sync_weights,
)

__all__ = [
    "AdapterEngine",
    "Engine",
    "Prompt",
    "RolloutBatch",
    "RolloutConfig",
    "RolloutEngine",
    "Sample",
    "SyncStats",
    "adapter_sync_problem",
    "drift_stats",
    "iter_adapter_tensors",
    "iter_checkpoint_tensors",
    "resolve_lora_sync",
    "sync_weights",
    "token_entropy",
    "token_logprobs",
]
