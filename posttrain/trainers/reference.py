"""The frozen reference policy of preference and RL trainers.

Three ways to get reference log-probs, chosen by the recipe:
  - LoRA: the policy itself with its adapter disabled (no second copy of the weights);
  - a frozen copy (ZeRO-3: partitioned by a DeepSpeed inference engine, like the policy);
  - precomputed: one pass over the data before training, cached on disk by fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("posttrain")


class FrozenReference:
    """Callable as ``reference(**batch) -> logits``, never trained."""

    def __init__(self, model: torch.nn.Module | None, *, policy=None, zero_stage: int = 0) -> None:
        self.policy = policy  # set when the reference is the policy with its LoRA adapter disabled
        self.module = None
        if model is not None:
            model.eval().requires_grad_(False)
            if zero_stage == 3:
                import deepspeed

                config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
                    "stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
                model = deepspeed.initialize(model=model, config=config)[0].module
            self.module = model

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.policy is not None:
            with self.policy.module.disable_adapter():
                return self.policy(input_ids=input_ids, attention_mask=attention_mask).logits
        return self.module(input_ids=input_ids, attention_mask=attention_mask).logits


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_or_compute(cache_dir: Path, key: str, compute, *, is_main: bool) -> torch.Tensor:
    """Reference log-probs from ``cache_dir/reference-<key>.pt``, or ``compute()`` and store them (collective)."""
    from posttrain.distributed import barrier

    path = cache_dir / f"reference-{key}.pt"
    if path.is_file():
        log.info("reference log-probs: loaded from %s", path)
        return torch.load(path)
    values = compute()
    if is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(values, tmp)
        tmp.rename(path)
        log.info("reference log-probs: computed and cached in %s", path)
    barrier()
    return values


@contextlib.contextmanager
def eval_mode(learner):
    learner.eval()
    try:
        yield
    finally:
        learner.train()
