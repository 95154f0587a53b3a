"""Full parameters out of any training layout, a bounded bucket at a time: the one gather path.

ZeRO-3 keeps only a shard of each parameter on each rank; ZeRO 0-2 keep full
parameters. Both are read here the same way: a bucket of whole parameters is
gathered (every rank takes part), handed to the consumer, and released when
the next one is asked for, so peak extra memory is one bucket, never a second
copy of the model. Weight sync (``posttrain.rollout.sync``) and saving
(``posttrain.learner.save``) both stand on ``iter_full_parameters``.

Two things decide where bucket boundaries may fall (``plan_buckets``):

* **LoRA**: a layer's ``base_layer.weight``, ``lora_A`` and ``lora_B`` must be
  in one bucket, or the merge ``W + s * B @ A`` cannot be done bucket by bucket.
  The indivisible unit is therefore one (PEFT-unwrapped) module.
* **vLLM's fused layers**: vLLM stacks ``q/k/v_proj`` into ``qkv_proj`` and
  ``gate/up_proj`` into ``gate_up_proj``. Its in-place reload buffers the
  pieces of a fused layer until the layer is complete, so a fused layer split
  over two buckets keeps the first bucket's pieces alive into the next. The
  planner keeps such a group together whenever it fits in one bucket.

The plan depends only on names and sizes, so every rank computes the same
plan — ZeRO-3 gathering is collective and all ranks must gather the same
buckets in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector")

# HF module names vLLM fuses into one layer (its models' ``packed_modules_mapping``,
# inverted). Standard across the Llama/Mistral/Qwen families.
PACKED_MODULES: Mapping[str, str] = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}

_PEFT_PREFIX = "base_model.model."


def module_path(name: str) -> str:
    """The (PEFT-unwrapped) module that owns parameter ``name``.

    ``base_model.model.m.layers.0.q_proj.lora_A.default.weight`` and
    ``...q_proj.base_layer.weight`` both give ``m.layers.0.q_proj``.
    """
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    for marker in (*LORA_MARKERS, ".modules_to_save.", ".original_module."):
        cut = name.find(marker)
        if cut >= 0:
            return name[:cut]
    name = name.replace(".base_layer.", ".")
    return name.rpartition(".")[0]


def fused_group(module: str, packed: Mapping[str, str] = PACKED_MODULES) -> str:
    """The engine-side layer a module loads into: ``x.q_proj`` -> ``x.qkv_proj``; others unchanged."""
    parent, _, leaf = module.rpartition(".")
    if leaf in packed:
        return f"{parent}.{packed[leaf]}" if parent else packed[leaf]
    return module


def _runs(keys: Sequence[str]) -> list[list[int]]:
    """Indices grouped into runs of equal consecutive keys."""
    runs: list[list[int]] = []
    for i, key in enumerate(keys):
        if runs and keys[runs[-1][0]] == key:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def plan_buckets(
    entries: Sequence[tuple[str, int]], bucket_bytes: int, packed: Mapping[str, str] = PACKED_MODULES
) -> list[list[int]]:
    """Split ``(name, nbytes)`` entries, in order, into buckets of indices.

    A bucket holds at most ``bucket_bytes`` unless a single module's parameters
    alone exceed it (then that module is a bucket of its own). Fused groups
    (see module docstring) are kept whole when they fit in a bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    names = [name for name, _ in entries]
    sizes = [nbytes for _, nbytes in entries]
    modules = [module_path(name) for name in names]
    groups = [fused_group(module, packed) for module in modules]

    buckets: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0

    def add(unit: list[int]) -> None:
        nonlocal current, current_bytes
        unit_bytes = sum(sizes[i] for i in unit)
        if current and current_bytes + unit_bytes > bucket_bytes:
            buckets.append(current)
            current, current_bytes = [], 0
        current = current + unit
        current_bytes += unit_bytes

    for group in _runs(groups):
        if sum(sizes[i] for i in group) <= bucket_bytes:
            add(group)
        else:  # too big to keep fused: fall back to whole modules
            for sub in _runs([modules[i] for i in group]):
                add([group[i] for i in sub])
    if current:
        buckets.append(current)
    return buckets


def is_partitioned(param: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter holds only this rank's shard."""
    return hasattr(param, "ds_id")


def full_nbytes(param: torch.Tensor) -> int:
    numel = param.ds_numel if is_partitioned(param) else param.numel()
    return numel * param.element_size()


def iter_full_parameters(
    module: torch.nn.Module,
    *,
    bucket_bytes: int = 256 * 2**20,
    packed: Mapping[str, str] = PACKED_MODULES,
    select: Callable[[str], bool] | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield each planned bucket (``plan_buckets``) as ``(name, full tensor)`` pairs; collective under ZeRO-3.

    A bucket holds at most ~``bucket_bytes`` unless one module alone is larger. ``select``: a predicate on
    parameter names; only those are planned and gathered (e.g. just the LoRA factors). It must give the
    same answer on every rank.

    The tensors alias the gathered (or, unpartitioned, the live) parameters: no
    copy is made. A ZeRO-3 bucket is re-partitioned when the consumer asks for
    the next one; re-partitioning only drops DeepSpeed's reference, so tensors
    the consumer still holds stay valid until it lets them go. Consumers must
    not modify them. Every rank must iterate to the end.
    """
    named = [(name, param) for name, param in module.named_parameters() if select is None or select(name)]
    plan = plan_buckets([(name, full_nbytes(param)) for name, param in named], bucket_bytes, packed)
    for indices in plan:
        bucket = [named[i] for i in indices]
        params = [param for _, param in bucket]
        if any(is_partitioned(param) for param in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield [(name, param.data.detach()) for name, param in bucket]
        else:
            yield [(name, param.data.detach()) for name, param in bucket]


def peft_base_name(name: str) -> str:
    """``base_model.model.x.base_layer.weight`` -> ``x.weight`` (PEFT's wrapping removed)."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def is_lora_name(name: str) -> bool:
    return any(marker in name for marker in LORA_MARKERS)


def merge_lora_tensors(
    named: dict[str, torch.Tensor], *, scaling: float, adapter: str = "default"
) -> dict[str, torch.Tensor]:
    """Fold LoRA factors into their base weights: W' = W + scaling * (B @ A).

    Takes PEFT-named tensors (a full state or a bucket holding whole layers)
    and returns plain model names, as ``AutoModelForCausalLM`` expects them.
    LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021).
    """
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in named.items():
        if is_lora_name(name):
            continue
        base = peft_base_name(name)
        if name.endswith(".base_layer.weight"):
            prefix = name[: -len(".base_layer.weight")]
            lora_a = named.get(f"{prefix}.lora_A.{adapter}.weight")
            lora_b = named.get(f"{prefix}.lora_B.{adapter}.weight")
            if lora_a is not None and lora_b is not None:
                delta = (lora_b.float() @ lora_a.float()) * scaling
                tensor = (tensor.float() + delta).to(tensor.dtype)
        merged[base] = tensor
    return merged
