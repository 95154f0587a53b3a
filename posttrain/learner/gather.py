"""Full parameters out of any training layout, a bounded bucket at a time.

ZeRO-3 keeps only a shard of each parameter on each rank; ZeRO 0-2 keep full
parameters. Both are read here the same way: a bucket of parameters is
gathered (every rank takes part), copied out, and released, so peak extra
memory is one bucket, never a second copy of the model. Saving and weight sync
both stand on this.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector")


def _is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _full_numel(param: torch.nn.Parameter) -> int:
    return param.ds_numel if _is_partitioned(param) else param.numel()


def _materialise(bucket: list[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, torch.Tensor]]:
    params = [p for _, p in bucket]
    if any(_is_partitioned(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            # Copy out: the gathered storage is released when the context exits.
            return [(name, p.data.detach().clone()) for name, p in bucket]
    return [(name, p.data.detach()) for name, p in bucket]


def iter_full_parameters(
    module: torch.nn.Module, *, bucket_bytes: int = 256 * 2**20
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of ``(name, full tensor)``, each list at most ~``bucket_bytes`` (one parameter at least).

    Collective under ZeRO-3: every rank must iterate to the end.
    """
    bucket: list[tuple[str, torch.nn.Parameter]] = []
    size = 0
    for name, param in module.named_parameters():
        nbytes = _full_numel(param) * param.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield _materialise(bucket)
            bucket, size = [], 0
        bucket.append((name, param))
        size += nbytes
    if bucket:
        yield _materialise(bucket)


def peft_base_name(name: str) -> str:
    """``base_model.model.x.base_layer.weight`` -> ``x.weight`` (PEFT's wrapping removed)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
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
