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

from posttrain.learner.packing import forward_logits

log = logging.getLogger("posttrain")


class FrozenReference:
    """Reference logits and log-probs without a graph; never trained."""

    def __init__(self, model: torch.nn.Module | None, *, policy=None, zero_stage: int = 0) -> None:
        self.policy = policy  # set when the reference is the policy with its LoRA adapter disabled
        self.module = None
        # inference_mode skips autograd bookkeeping entirely, but only for a module of its own: ZeRO-3
        # gathers (and LoRA's shared base) would leave inference tensors inside the trained model.
        self.no_grad = torch.inference_mode if model is not None and zero_stage != 3 else torch.no_grad
        if model is not None:
            model.eval().requires_grad_(False)
            if zero_stage == 3:
                from posttrain.learner.engine import initialize_deepspeed

                config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
                    "stage": 3, "stage3_param_persistence_threshold": 0}, "steps_per_print": 10**9}
                model = initialize_deepspeed(model=model, config=config)[0].module
            self.module = model

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, padding_free: bool = False) -> torch.Tensor:
        """Logits ``[B, T, V]`` of a right-padded batch; ``padding_free``: computed on the packed sequences."""
        with self.no_grad():
            if self.policy is not None:
                with self.policy.module.disable_adapter():
                    return forward_logits(self.policy, input_ids, attention_mask, padding_free=padding_free)
            return forward_logits(self.module, input_ids, attention_mask, padding_free=padding_free)

    def sequence_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs [N] and completion token counts [N] of a collated batch."""
        from posttrain.learner.logprobs import completion_logprobs

        with self.no_grad():
            logits = self.logits(batch["input_ids"], batch["attention_mask"])
            sums, counts = completion_logprobs(logits, batch["input_ids"], batch["completion_mask"])
        return sums.clone(), counts.clone()  # plain tensors, usable next to the policy's graph


def weights_identity(model_path: str) -> list:
    """What identifies a model directory's weights cheaply: its config and each weight file's size and mtime."""
    from posttrain.checkpoint import model_identity

    root = Path(model_path)
    files = sorted(p for p in root.glob("*") if p.suffix in (".safetensors", ".bin")) if root.is_dir() else []
    return [model_identity(model_path)] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_or_compute(cache_dir: Path, key: str, compute, *, is_main: bool) -> torch.Tensor:
    """Reference log-probs from ``cache_dir/reference-<key>.pt``, or ``compute()`` and store them (collective)."""
    from posttrain.distributed import barrier, broadcast_object

    path = cache_dir / f"reference-{key}.pt"
    # Rank 0 decides for all: a rank that looked after rank 0 had written the file would skip the
    # (possibly collective) computation the others are in.
    if broadcast_object(path.is_file()):
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
