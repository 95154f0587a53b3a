"""Tensor-parallel generation groups of a colocated run (``rollout.tensor_parallel_size`` > 1).

Each rank holds one shard of a vLLM engine (``distributed_executor_backend="external_launcher"``); the T
ranks of a group run one engine together, so every one of them must submit the same requests in the same
order (vLLM keeps the shards in step by determinism, not by messages). A ``GenerationGroup`` stands where a
colocated run's ``RolloutEngine`` stands: its ``generate`` gathers the prompts and per-prompt seeds of all the
group's ranks, submits their union on every shard, and hands each rank back the samples of its own prompts.
Per-prompt seeds make the samples those of ``tensor_parallel_size: 1`` with the same seed.

Weights need no gathering of their own: ``sync_weights`` streams full tensors on every rank (from ZeRO
partitions, a bucket at a time) and each shard's vLLM weight loader keeps the slice it serves, so the extra
memory of a rank is one bucket plus its shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from posttrain.rollout.batches import split_batch
from posttrain.rollout.config import RolloutConfig
from posttrain.rollout.engine import RolloutBatch, RolloutEngine
from posttrain.rollout.layout import Layout
from posttrain.rollout.protocol import Bucket, RunOnCollect


class GenerationGroup(RunOnCollect):
    """This rank's handle on the tensor-parallel engine it is a shard of; an ``AdapterEngine``
    (``posttrain.rollout.protocol``). Collective over the group's ranks: each calls ``generate`` (also with
    no prompts) in the same order. The rest is the shard's ``RolloutEngine``'s: the protocol's members are
    passed on explicitly, other attributes (``tokenizer``, ``held_parameters``, ...) through ``__getattr__``."""

    collective = True  # callers must call generate even with nothing to ask

    def __init__(self, engine: RolloutEngine, layout: Layout, rank: int) -> None:
        import torch.distributed as dist

        self.engine = engine
        self.layout = layout
        # new_group is collective over the whole world: every rank creates every group, in the same order.
        groups = [dist.new_group(layout.members(e), backend="gloo") for e in range(layout.engines)]
        self.engine_index = layout.engine_of(rank)
        self.group = groups[self.engine_index]
        self.position = layout.members(self.engine_index).index(rank)

    def generate(self, prompts: Sequence, *, n: int | None = None, seed: int | None = None,
                 seeds: Sequence[int] | None = None, **sampling) -> RolloutBatch:
        """This rank's prompts sampled by the group's engine; arguments as ``RolloutEngine.generate``."""
        import torch.distributed as dist

        n = self.engine.cfg.n if n is None else n
        if seeds is None and seed is not None:
            seeds = [seed + i * n for i in range(len(prompts))]  # RolloutEngine.generate's own rule
        mine = (list(prompts), None if seeds is None else list(seeds))
        gathered: list[Any] = [None] * self.layout.tensor_parallel_size
        dist.all_gather_object(gathered, mine, group=self.group)
        union = [p for ps, _ in gathered for p in ps]
        # Without seeds every shard derives the same ones from its call counter (the calls are the same).
        union_seeds = None if any(s is None for _, s in gathered) else [x for _, s in gathered for x in s]
        batch = self.engine.generate(union, n=n, seeds=union_seeds, **sampling)
        return split_batch(batch, [len(ps) for ps, _ in gathered])[self.position]

    # ---- the rest of the protocol: the shard's own --------------------------------------------
    @property
    def cfg(self) -> RolloutConfig:
        return self.engine.cfg

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def lora_enabled(self) -> bool:
        return self.engine.lora_enabled

    @property
    def has_adapter_base(self) -> bool:
        return self.engine.has_adapter_base

    @property
    def max_lora_rank(self) -> int | None:
        return self.engine.max_lora_rank

    def load_buckets(self, buckets: Iterable[Bucket], stats=None, *, adapter_base: bool = False) -> None:
        """Every shard loads full tensors; its vLLM weight loader keeps the slice it serves."""
        self.engine.load_buckets(buckets, stats, adapter_base=adapter_base)

    def unsupported_lora_modules(self, modules: Iterable[str]) -> list[str]:
        return self.engine.unsupported_lora_modules(modules)

    def load_adapter(self, tensors: Mapping[str, torch.Tensor]) -> int:
        return self.engine.load_adapter(tensors)

    def sleep(self, level: int | None = None) -> None:
        self.engine.sleep(level)

    def close(self) -> None:
        self.engine.close()

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet (during unpickling or a failed __init__)
            raise AttributeError(name)
        return getattr(self.engine, name)
