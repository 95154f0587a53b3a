"""Rollouts: a vLLM engine in the learner's process, weight sync into it, and log-prob checks.

Importing this package does not import vLLM; ``RolloutEngine`` does, when created.
"""

from posttrain.rollout.config import RolloutConfig
from posttrain.rollout.engine import Prompt, RolloutBatch, RolloutEngine, Sample
from posttrain.rollout.logprobs import drift_stats, token_entropy, token_logprobs
from posttrain.rollout.sync import SyncStats, iter_checkpoint_tensors, sync_weights

__all__ = [
    "Prompt",
    "RolloutBatch",
    "RolloutConfig",
    "RolloutEngine",
    "Sample",
    "SyncStats",
    "drift_stats",
    "iter_checkpoint_tensors",
    "sync_weights",
    "token_entropy",
    "token_logprobs",
]
