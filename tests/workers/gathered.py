"""The reference side of the sync tests: a learner's full weights, gathered from any ZeRO stage."""

from __future__ import annotations

import torch


def gathered_state(learner) -> dict[str, torch.Tensor]:
    """``{name: full tensor}`` copies of the DeepSpeed ``learner``'s parameters (PEFT names included).

    Collective under ZeRO-3: every rank must call it. Independent of posttrain's sync path on purpose, so the
    tests compare that path against plain DeepSpeed gathering.
    """
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(learner.module.parameters())):
        return {name: p.detach().clone() for name, p in learner.module.named_parameters()}
