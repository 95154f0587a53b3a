"""The trained policy and its frozen reference, as every recipe that trains a causal LM builds them."""

from __future__ import annotations

import logging

from posttrain.distributed import DistInfo
from posttrain.learner import build_learner
from posttrain.learner.engine import apply_lora
from posttrain.models.loading import load_causal_lm
from posttrain.trainers.common import RecipeConfig
from posttrain.trainers.reference import FrozenReference

log = logging.getLogger("posttrain")


def build_policy(cfg: RecipeConfig, dist: DistInfo, grad_accum: int, total_steps: int):
    """The trained causal LM (LoRA-wrapped if configured) under the DeepSpeed learner."""
    model = load_causal_lm(cfg.model)
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora)
    return build_learner(model, cfg.learner, world_size=dist.world_size, micro_batch_size=cfg.train.micro_batch_size,
                         grad_accum=grad_accum, total_steps=total_steps)


def build_reference(cfg: RecipeConfig, learner, reference_path: str | None = None) -> FrozenReference:
    """The frozen reference: the policy with its LoRA adapter disabled (no second copy), else a copy of
    ``reference_path`` or of the policy's initial weights (partitioned like the policy under ZeRO-3)."""
    if cfg.model.lora.enabled and not reference_path:
        log.info("reference: the policy with its LoRA adapter disabled (no second copy)")
        return FrozenReference(None, policy=learner)
    path = reference_path or cfg.model.path
    log.info("reference: a frozen copy of %s", path)
    model = load_causal_lm(type(cfg.model)(path=path, dtype=cfg.model.dtype,
                                           trust_remote_code=cfg.model.trust_remote_code))
    return FrozenReference(model, zero_stage=cfg.learner.zero_stage)
