"""What the trainers and the weight sync ask of a rollout engine, whichever kind it is.

Three classes implement ``Engine``:

- ``RolloutEngine`` (``posttrain/rollout/engine.py``): vLLM in this process; not collective.
- ``GenerationGroup`` (``posttrain/rollout/groups.py``): this rank's shard of a colocated tensor-parallel
  engine; collective over the group's ranks.
- ``RemoteEngine`` (``posttrain/rollout/remote.py``): the rollout ranks of a disaggregated run, driven by the
  learner ranks; collective over the learners.

Callers branch on ``collective``, never on the engine's class.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from posttrain.rollout.config import RolloutConfig
    from posttrain.rollout.engine import RolloutBatch
    from posttrain.rollout.sync import SyncStats

# One bucket of a weight sync: whole parameters as (HF checkpoint name, full tensor) pairs.
Bucket = list[tuple[str, torch.Tensor]]


@runtime_checkable
class Engine(Protocol):
    """A rollout engine. ``collective``: every rank calls ``generate`` / ``submit`` / ``collect`` and
    ``load_buckets`` in the same order, also with no prompts (the calls are collective); False: a rank with
    nothing to ask may skip ``generate``."""

    collective: bool
    cfg: RolloutConfig
    device: torch.device  # where sync measures the memory a load takes

    @property
    def lora_enabled(self) -> bool:
        """The engine can serve a LoRA adapter (``AdapterEngine``); False: syncs send merged weights."""
        ...

    def generate(self, prompts: Sequence, *, n: int | None = None, seed: int | None = None,
                 seeds: Sequence[int] | None = None, **sampling: Any) -> RolloutBatch:
        """``n`` samples per prompt (default ``cfg.n``); prompt ``i`` seeded with ``seed + i * n``, or by
        ``seeds[i]``; ``sampling`` overrides the config for this call (temperature, max_tokens, ...)."""
        ...

    def submit(self, prompts: Sequence, *, n: int | None = None, seed: int | None = None,
               seeds: Sequence[int] | None = None, **sampling: Any) -> None:
        """Start a ``generate`` (same arguments); ``collect`` returns its result and must come before the
        engine takes any other request."""
        ...

    def collect(self) -> RolloutBatch:
        """The result of the last ``submit``."""
        ...

    def load_buckets(self, buckets: Iterable[Bucket], stats: SyncStats | None = None, *,
                     adapter_base: bool = False) -> None:
        """Overwrite the engine's weights in place from a stream of buckets (``sync_weights``' one entry for
        every engine). ``stats``: the sync's, for what the engine measures itself; ``adapter_base``: these
        are the base weights a LoRA adapter will be applied to."""
        ...

    def sleep(self, level: int | None = None) -> None:
        """Free what the engine can while the learner trains (a no-op where there is nothing to free)."""
        ...

    def close(self) -> None:
        """Shut the engine down."""
        ...


@runtime_checkable
class AdapterEngine(Engine, Protocol):
    """An ``Engine`` whose syncs may send only a LoRA adapter (used only where ``lora_enabled``)."""

    has_adapter_base: bool  # holds the base weights an adapter applies to
    max_lora_rank: int | None

    def unsupported_lora_modules(self, modules: Iterable[str]) -> list[str]:
        """Those of ``modules`` (HF module names) the engine cannot apply LoRA to."""
        ...

    def load_adapter(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """Serve generation with these LoRA factors from now on; return the adapter's version."""
        ...


class RunOnCollect:
    """``submit`` / ``collect`` for an engine that generates in the caller's process: there is nothing to
    overlap with, so ``submit`` keeps the request and ``collect`` runs it with ``generate``."""

    _submitted: tuple[list, dict[str, Any]] | None = None

    def submit(self, prompts: Sequence, **kwargs: Any) -> None:
        if self._submitted is not None:
            raise RuntimeError(f"{type(self).__name__}.submit: the previous generate was not collected")
        self._submitted = (list(prompts), kwargs)

    def collect(self) -> RolloutBatch:
        if self._submitted is None:
            raise RuntimeError(f"{type(self).__name__}.collect: nothing was submitted")
        (prompts, kwargs), self._submitted = self._submitted, None
        return self.generate(prompts, **kwargs)  # type: ignore[attr-defined]
