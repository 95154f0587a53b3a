"""Weight sync: stream the learner's parameters into the rollout engine, a bucket at a time.

The learner's training layout (a plain module, a ZeRO-3-partitioned one, a
PEFT LoRA wrapper, or any of those under a DeepSpeed engine) is turned into
Hugging Face checkpoint names and full tensors, bucket by bucket, and fed to
vLLM's in-place reload, which maps HF names onto its own layout (stacking
q/k/v and gate/up, sharding for tensor parallelism, re-packing CPU kernels).

Memory: a bucket is gathered, handed over and released before the next one;
nothing holds a second copy of the model. ``SyncStats`` reports the largest
bucket and the measured peak growth of the process (or GPU allocator).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from posttrain.learner.gather import is_lora_name, merge_lora_tensors, peft_base_name
from posttrain.rollout.buckets import PACKED_MODULES, iter_gathered_buckets, module_path
from posttrain.rollout.memory import PeakMemory

if TYPE_CHECKING:
    from posttrain.rollout.engine import RolloutEngine

DEFAULT_BUCKET_BYTES = 256 * 2**20
_UNSUPPORTED_LORA = (".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector")


@dataclass
class SyncStats:
    """What one sync cost. Byte counts are of full (unsharded) tensors."""

    seconds: float  # wall time of the whole sync, engine-side loading included
    gather_seconds: float  # part of it spent gathering buckets and merging LoRA
    bytes: int  # bytes handed to the engine (merged weights; LoRA factors not counted)
    num_tensors: int
    num_buckets: int
    peak_bucket_bytes: int  # most bytes one bucket held: gathered tensors plus LoRA-merged copies
    largest_tensor_bytes: int  # largest single gathered parameter
    measured_peak_bytes: int | None  # measured growth during the sync; None where it cannot be measured
    memory_source: str | None  # "cuda_allocator", "rss_high_water" or None
    remote_peak_bytes: int | None = None  # disaggregated: the largest growth a rollout rank measured while loading

    def as_metrics(self, prefix: str = "sync/") -> dict[str, float]:
        """Flat numeric metrics for the run's metrics log."""
        return {prefix + key: float(value) for key, value in asdict(self).items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)}


@dataclass(frozen=True)
class _LoraLayer:
    scaling: float
    fan_in_fan_out: bool


def unwrap_module(module) -> torch.nn.Module:
    """The model inside a ``Learner`` or a DeepSpeed engine; a plain module is returned as is."""
    while not _is_peft_model(module):
        inner = getattr(module, "module", None)
        if not isinstance(inner, torch.nn.Module):
            break
        module = inner
    return module


def _is_peft_model(module) -> bool:
    return type(module).__name__.startswith("Peft")


def _active_adapter(model: torch.nn.Module, adapter: str | None) -> str:
    if adapter is not None:
        return adapter
    active = getattr(model, "active_adapter", "default")
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise NotImplementedError(f"weight sync merges one LoRA adapter, but {list(active)} are active")
        active = active[0]
    return active


def _lora_layers(model: torch.nn.Module, adapter: str, scaling: float | None) -> dict[str, _LoraLayer]:
    """Per LoRA layer (keyed by PEFT-unwrapped module path): its scaling and weight orientation."""
    layers: dict[str, _LoraLayer] = {}
    for name, sub in model.named_modules():
        lora_a = getattr(sub, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or adapter not in lora_a:
            continue
        if getattr(sub, "use_dora", {}).get(adapter, False):
            raise NotImplementedError("weight sync cannot merge DoRA adapters yet; use plain LoRA")
        layer_scaling = scaling if scaling is not None else float(sub.scaling[adapter])
        layers[module_path(name + ".weight")] = _LoraLayer(layer_scaling, bool(getattr(sub, "fan_in_fan_out", False)))
    return layers


def _to_checkpoint_names(
    bucket: list[tuple[str, torch.Tensor]], lora: dict[str, _LoraLayer] | None, adapter: str
) -> tuple[list[tuple[str, torch.Tensor]], int]:
    """HF-named tensors for one bucket (LoRA merged); also the bytes of newly made merged tensors."""
    if lora is None:
        return bucket, 0
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in bucket:
        if any(marker in name for marker in _UNSUPPORTED_LORA):
            raise NotImplementedError(f"weight sync cannot merge {name!r}: only LoRA on linear layers is supported")
        if ".original_module." in name:
            continue  # superseded by its trained copy under modules_to_save
        if ".modules_to_save." in name:
            head, _, tail = name.partition(".modules_to_save.")
            if not tail.startswith(adapter + "."):
                continue
            name = f"{head}.{tail[len(adapter) + 1:]}"
        elif is_lora_name(name) and f".{adapter}." not in name:
            continue  # another, inactive adapter
        by_module.setdefault(module_path(name), {})[name] = tensor
    out: list[tuple[str, torch.Tensor]] = []
    made = 0
    for module, named in by_module.items():
        layer = lora.get(module)
        if layer is None:
            out.extend((peft_base_name(name), tensor) for name, tensor in named.items())
            continue
        if layer.fan_in_fan_out:
            raise NotImplementedError(f"weight sync cannot merge fan_in_fan_out LoRA layers ({module})")
        merged = merge_lora_tensors(named, scaling=layer.scaling, adapter=adapter)
        for name, tensor in merged.items():
            if name.endswith(".weight") and any(is_lora_name(n) for n in named):
                made += tensor.numel() * tensor.element_size()
            out.append((name, tensor))
    return out, made


def iter_checkpoint_buckets(
    module,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    lora_scaling: float | None = None,
    adapter: str | None = None,
    stats: SyncStats | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Stream buckets of ``(HF checkpoint name, full tensor)`` pairs out of any training layout.

    LoRA adapters are merged into their base weights; names lose PEFT's wrapping. Collective under
    ZeRO-3: every rank must exhaust it. Tensors may alias live parameters: read them, do not modify them.
    A bucket's gathered parameters are released when the next bucket is asked for.
    """
    model = unwrap_module(module)
    names = [name for name, _ in model.named_parameters()]
    lora = None
    active = "default"
    if _is_peft_model(model) or any(is_lora_name(name) for name in names):
        active = _active_adapter(model, adapter)
        lora = _lora_layers(model, active, lora_scaling)
    buckets = iter_gathered_buckets(model, bucket_bytes, PACKED_MODULES)
    while True:
        start = time.perf_counter()
        bucket = next(buckets, None)
        if bucket is None:
            break
        tensors, made = _to_checkpoint_names(bucket, lora, active)
        if stats is not None:
            stats.gather_seconds += time.perf_counter() - start
            gathered = sum(t.numel() * t.element_size() for _, t in bucket)
            stats.num_buckets += 1
            stats.peak_bucket_bytes = max(stats.peak_bucket_bytes, gathered + made)
            stats.largest_tensor_bytes = max(
                stats.largest_tensor_bytes, max(t.numel() * t.element_size() for _, t in bucket)
            )
            stats.num_tensors += len(tensors)
            stats.bytes += sum(t.numel() * t.element_size() for _, t in tensors)
        yield tensors
        del bucket, tensors  # let the bucket go before the next is gathered


def iter_checkpoint_tensors(module, **kwargs) -> Iterator[tuple[str, torch.Tensor]]:
    """``iter_checkpoint_buckets`` (same arguments) one ``(HF checkpoint name, full tensor)`` pair at a
    time: the stream ``sync_weights`` feeds an engine, usable on its own. Collective under ZeRO-3."""
    for bucket in iter_checkpoint_buckets(module, **kwargs):
        yield from bucket
        del bucket


def sync_weights(
    engine: RolloutEngine | None,
    module,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    lora_scaling: float | None = None,
    adapter: str | None = None,
) -> SyncStats:
    """Copy ``module``'s current weights into ``engine``'s model, in place; return what it cost.

    ``module``: a plain ``nn.Module``, a PEFT model, a DeepSpeed engine or a
    ``Learner`` (ZeRO 0-3). ``engine`` may be ``None`` on ranks without an
    engine: they still take part in the collective ZeRO-3 gathers, so call
    this on every rank. ``lora_scaling`` overrides each LoRA layer's own
    ``alpha / r`` scaling; ``adapter`` picks the adapter (default: the active one).
    The engine's prefix cache is reset afterwards (its KV came from old weights).
    An engine with ``load_buckets`` (a disaggregated run's ``RemoteEngine``) takes whole buckets.
    """
    stats = SyncStats(0.0, 0.0, 0, 0, 0, 0, 0, None, None)
    model = unwrap_module(module)
    device = engine.device if engine is not None else next(model.parameters()).device
    start = time.perf_counter()
    with torch.no_grad(), PeakMemory(device) as meter:
        stream = iter_checkpoint_buckets(model, bucket_bytes=bucket_bytes, lora_scaling=lora_scaling,
                                         adapter=adapter, stats=stats)
        try:
            if hasattr(engine, "load_buckets"):
                engine.load_buckets(stream, stats)
            elif engine is not None:
                engine.load_weights(pair for bucket in stream for pair in bucket)
        finally:
            # Engine-less ranks, whatever the engine left, or an engine that failed midway: finish the
            # collective ZeRO-3 gathers so the other ranks are not left waiting.
            for _ in stream:
                pass
    stats.seconds = time.perf_counter() - start
    stats.measured_peak_bytes = meter.peak_extra_bytes
    stats.memory_source = meter.source
    return stats
