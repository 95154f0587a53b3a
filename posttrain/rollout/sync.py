"""Weight sync: stream the learner's parameters into the rollout engine, a bucket at a time.

The learner's training layout (a plain module, a ZeRO-3-partitioned one, a
PEFT LoRA wrapper, or any of those under a DeepSpeed engine) is turned into
Hugging Face checkpoint names and full tensors, bucket by bucket, and fed to
vLLM's in-place reload, which maps HF names onto its own layout (stacking
q/k/v and gate/up, sharding for tensor parallelism, re-packing CPU kernels).

A LoRA learner is synced one of two ways (``rollout.lora_sync``): **merged**,
each layer's ``W + s * B @ A`` computed bucket by bucket and streamed as full
weights; or **adapter**, only the factors ``A`` and ``s * B`` handed to vLLM's
LoRA support (the frozen base weights are sent once, by the first such sync).

Memory: a bucket is gathered, handed over and released before the next one;
nothing holds a second copy of the model. ``SyncStats`` reports the largest
bucket and the measured peak growth of the process (or GPU allocator).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import torch

from posttrain.errors import UserError
from posttrain.learner.gather import (
    is_lora_name,
    is_partitioned,
    iter_full_parameters,
    merge_lora_tensors,
    module_path,
    peft_base_name,
)
from posttrain.rollout.memory import PeakMemory

if TYPE_CHECKING:
    from posttrain.rollout.protocol import AdapterEngine, Engine

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 * 2**20
LoraSync = Literal["auto", "adapter", "merged"]
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
    # "full" (no LoRA), "merged" (LoRA merged into full weights) or "adapter" (only the LoRA factors;
    # the first adapter sync also sends the base weights, counted in bytes and base_bytes)
    mode: str = "full"
    base_bytes: int = 0  # part of bytes that were base weights sent for an adapter to apply to

    def as_metrics(self, prefix: str = "sync/") -> dict[str, float]:
        """Flat numeric metrics for the run's metrics log (``adapter_only``: 1 for an adapter sync)."""
        metrics = {prefix + key: float(value) for key, value in asdict(self).items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        metrics[prefix + "adapter_only"] = float(self.mode == "adapter")
        return metrics


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
        if layer is None:  # not a LoRA layer, or LoRA left unmerged (then its factors are dropped)
            out.extend((peft_base_name(name), tensor) for name, tensor in named.items() if not is_lora_name(name))
            continue
        if layer.fan_in_fan_out:
            raise NotImplementedError(f"weight sync cannot merge fan_in_fan_out LoRA layers ({module})")
        merged = merge_lora_tensors(named, scaling=layer.scaling, adapter=adapter)
        for name, tensor in merged.items():
            if name.endswith(".weight") and any(is_lora_name(n) for n in named):
                made += tensor.numel() * tensor.element_size()
            out.append((name, tensor))
    return out, made


def _not_lora(name: str) -> bool:
    return not is_lora_name(name)


def iter_checkpoint_buckets(
    module,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    lora_scaling: float | None = None,
    adapter: str | None = None,
    stats: SyncStats | None = None,
    merge_lora: bool = True,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Stream buckets of ``(HF checkpoint name, full tensor)`` pairs out of any training layout.

    LoRA adapters are merged into their base weights, or with ``merge_lora=False`` left out (the base
    weights alone); names lose PEFT's wrapping. Collective under ZeRO-3: every rank must exhaust it.
    Tensors may alias live parameters: read them, do not modify them. A bucket's gathered parameters are
    released when the next bucket is asked for.
    """
    model = unwrap_module(module)
    names = [name for name, _ in model.named_parameters()]
    lora = None
    active = "default"
    select = None
    if _is_peft_model(model) or any(is_lora_name(name) for name in names):
        active = _active_adapter(model, adapter)
        lora = _lora_layers(model, active, lora_scaling) if merge_lora else {}
        if not merge_lora:
            select = _not_lora  # the factors are not needed: do not gather them
    buckets = iter_full_parameters(model, bucket_bytes=bucket_bytes, select=select)
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


def adapter_sync_problem(module, *, adapter: str | None = None, engine: Engine | None = None) -> str | None:
    """Why syncing only the LoRA adapter of ``module`` (into ``engine``, if given) would not work; None if it would.

    Only plain LoRA on linear layers, with every other parameter frozen, can be
    served as an adapter: vLLM has no DoRA, LoRA bias or embedding LoRA here,
    and trained non-LoRA parameters (``modules_to_save``) would never reach it.
    """
    model = unwrap_module(module)
    named = list(model.named_parameters())
    if not any(is_lora_name(name) for name, _ in named):
        return "the learner has no LoRA adapter"
    try:
        active = _active_adapter(model, adapter)
    except NotImplementedError as err:
        return str(err)
    peft_config = getattr(model, "peft_config", {}).get(active)
    if getattr(peft_config, "lora_bias", False):
        return "the adapter trains LoRA biases (lora_bias), which vLLM cannot serve"
    for name, sub in model.named_modules():
        if isinstance(getattr(sub, "lora_embedding_A", None), torch.nn.ParameterDict) and active in sub.lora_embedding_A:
            return f"the adapter has LoRA on an embedding ({module_path(name + '.weight')}), which vLLM cannot serve here"
        lora_a = getattr(sub, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or active not in lora_a:
            continue
        if getattr(sub, "use_dora", {}).get(active, False):
            return "the adapter uses DoRA, which vLLM cannot serve"
        if getattr(sub, "fan_in_fan_out", False):
            return f"{module_path(name + '.weight')} is a fan_in_fan_out LoRA layer"
    trained = [name for name, param in named if param.requires_grad and not is_lora_name(name)]
    if trained:
        return (f"parameters outside the adapter are trained too ({', '.join(trained[:3])}"
                f"{', ...' if len(trained) > 3 else ''}), and an adapter-only sync would never send them")
    if engine is not None:
        return _engine_adapter_problem(engine, named, active)
    return None


def _engine_adapter_problem(engine: AdapterEngine, named: list[tuple[str, torch.Tensor]], active: str) -> str | None:
    if not engine.lora_enabled:
        return "the rollout engine was started without LoRA support"
    factors = [(name, param) for name, param in named if is_lora_name(name) and f".{active}." in name]
    rank = max(_full_shape(param)[0] for name, param in factors if ".lora_A." in name)
    if rank > engine.max_lora_rank:
        return f"the adapter's rank {rank} is above the engine's max_lora_rank {engine.max_lora_rank}"
    unsupported = engine.unsupported_lora_modules({module_path(name) for name, _ in factors})
    if unsupported:
        return f"vLLM cannot apply LoRA to {', '.join(unsupported[:4])}"
    return None


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


_reported: set[str] = set()


def resolve_lora_sync(engine: Engine | None, module, *, lora_sync: LoraSync | None = None,
                      adapter: str | None = None) -> str:
    """How ``sync_weights`` will send ``module``: ``"full"`` (no LoRA), ``"merged"`` or ``"adapter"``.

    ``lora_sync`` defaults to the engine's ``cfg.lora_sync``. ``auto`` picks
    ``adapter`` when both the engine and the adapter allow it, else ``merged``;
    ``adapter`` raises a ``UserError`` saying why it cannot be done. A rank
    without an engine cannot decide ``auto`` and must be told the mode the
    engine ranks use: the modes gather different tensors, collectively under ZeRO-3.
    """
    model = unwrap_module(module)
    if not any(is_lora_name(name) for name, _ in model.named_parameters()):
        return "full"
    setting = lora_sync if lora_sync is not None else engine.cfg.lora_sync if engine is not None else None
    if engine is None:
        if setting not in ("adapter", "merged"):
            raise ValueError("a rank without an engine that syncs a LoRA learner must pass lora_sync='adapter' or "
                             "'merged' (the mode the engine ranks use) so that every rank gathers the same tensors")
        problem = adapter_sync_problem(model, adapter=adapter) if setting == "adapter" else None
    elif setting == "merged":
        return "merged"
    else:
        problem = adapter_sync_problem(model, adapter=adapter, engine=engine)
    if problem is None:
        return setting if engine is None else "adapter"
    if setting == "adapter":
        raise UserError(f"rollout.lora_sync is 'adapter', but {problem}.",
                        hint="Set rollout.lora_sync to merged (or auto, which falls back to it).")
    if problem not in _reported:  # once per reason, not every step
        _reported.add(problem)
        log.info("rollout.lora_sync=auto: %s; merging the adapter into full weights instead", problem)
    return "merged"


def iter_adapter_tensors(
    module, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES, lora_scaling: float | None = None, adapter: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The active adapter's factors as ``("<HF module>.lora_A.weight", A)`` and ``(".lora_B.weight", s * B)``.

    Each layer's scaling ``s`` (its own, or ``lora_scaling``) is folded into B, so
    the consumer applies ``W + B' @ A`` whatever its own alpha/rank rules. The
    tensors are new (gathered storage is released afterwards). Collective under
    ZeRO-3: every rank must exhaust it.
    """
    model = unwrap_module(module)
    active = _active_adapter(model, adapter)
    layers = _lora_layers(model, active, lora_scaling)
    marker = f".{active}."

    def select(name: str) -> bool:
        return is_lora_name(name) and marker in name

    for bucket in iter_full_parameters(model, bucket_bytes=bucket_bytes, select=select):
        for name, tensor in bucket:
            module_name = module_path(name)
            if ".lora_A." in name:
                yield f"{module_name}.lora_A.weight", tensor.clone()
            else:
                scaled = tensor.float() * layers[module_name].scaling
                yield f"{module_name}.lora_B.weight", scaled.to(tensor.dtype)


def _needs_base(engine: AdapterEngine | None, model: torch.nn.Module) -> bool:
    """Whether this adapter sync must first send the base weights; the same answer on every rank."""
    need = engine is not None and not engine.has_adapter_base
    if any(is_partitioned(param) for param in model.parameters()):
        from posttrain.distributed import all_reduce_max

        # Gathering the base is collective: ranks without an engine (or with one already holding the
        # base) must join when any engine needs it.
        need = all_reduce_max([float(need)])[0] > 0
    return need


def _sync_adapter(engine: AdapterEngine | None, model: torch.nn.Module, stats: SyncStats, *, bucket_bytes: int,
                  lora_scaling: float | None, adapter: str | None) -> None:
    if _needs_base(engine, model):
        _stream_weights(engine, model, stats, bucket_bytes=bucket_bytes, lora_scaling=lora_scaling,
                        adapter=adapter, merge_lora=False)
        stats.base_bytes = stats.bytes
    start = time.perf_counter()
    tensors = dict(iter_adapter_tensors(model, bucket_bytes=bucket_bytes, lora_scaling=lora_scaling,
                                        adapter=adapter))
    stats.gather_seconds += time.perf_counter() - start
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    stats.num_buckets += 1
    stats.num_tensors += len(tensors)
    stats.bytes += nbytes
    stats.peak_bucket_bytes = max(stats.peak_bucket_bytes, nbytes)
    stats.largest_tensor_bytes = max([stats.largest_tensor_bytes] + [t.numel() * t.element_size()
                                                                      for t in tensors.values()])
    if engine is not None:
        engine.load_adapter(tensors)


def _stream_weights(engine: Engine | None, model: torch.nn.Module, stats: SyncStats, *, bucket_bytes: int,
                    lora_scaling: float | None, adapter: str | None, merge_lora: bool) -> None:
    stream = iter_checkpoint_buckets(model, bucket_bytes=bucket_bytes, lora_scaling=lora_scaling, adapter=adapter,
                                     stats=stats, merge_lora=merge_lora)
    try:
        if engine is not None:
            engine.load_buckets(stream, stats, adapter_base=not merge_lora)
    finally:
        # Engine-less ranks, whatever the engine left, or an engine that failed midway: finish the
        # collective ZeRO-3 gathers so the other ranks are not left waiting.
        for _ in stream:
            pass


def sync_weights(
    engine: Engine | None,
    module,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    lora_scaling: float | None = None,
    adapter: str | None = None,
    lora_sync: LoraSync | None = None,
) -> SyncStats:
    """Copy ``module``'s current weights into ``engine``'s model, in place; return what it cost.

    ``module``: a plain ``nn.Module``, a PEFT model, a DeepSpeed engine or a
    ``Learner`` (ZeRO 0-3). ``engine`` may be ``None`` on ranks without an
    engine: they still take part in the collective ZeRO-3 gathers, so call
    this on every rank. ``lora_scaling`` overrides each LoRA layer's own
    ``alpha / r`` scaling; ``adapter`` picks the adapter (default: the active one).
    ``lora_sync`` (default: the engine's ``cfg.lora_sync``) chooses between
    sending only a LoRA adapter and merging it; see ``resolve_lora_sync``.
    The engine's prefix cache is reset afterwards (its KV came from old weights).
    Every engine (``posttrain.rollout.protocol.Engine``) takes the stream through its ``load_buckets``.
    """
    stats = SyncStats(0.0, 0.0, 0, 0, 0, 0, 0, None, None)
    model = unwrap_module(module)
    stats.mode = resolve_lora_sync(engine, model, lora_sync=lora_sync, adapter=adapter)
    device = engine.device if engine is not None else next(model.parameters()).device
    start = time.perf_counter()
    with torch.no_grad(), PeakMemory(device) as meter:
        if stats.mode == "adapter":
            _sync_adapter(engine, model, stats, bucket_bytes=bucket_bytes, lora_scaling=lora_scaling,
                          adapter=adapter)
        else:
            _stream_weights(engine, model, stats, bucket_bytes=bucket_bytes, lora_scaling=lora_scaling,
                            adapter=adapter, merge_lora=True)
    stats.seconds = time.perf_counter() - start
    stats.measured_peak_bytes = meter.peak_extra_bytes
    stats.memory_source = meter.source
    return stats
