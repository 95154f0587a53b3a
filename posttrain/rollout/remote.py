"""Disaggregated rollouts: vLLM engines on ranks of their own, driven by the learner ranks.

With ``rollout.placement=disaggregated`` the last ``rollout.ranks`` ranks of the run only host an engine
(``serve``) and the other ranks only the learner (see ``posttrain.distributed``). On the learner ranks a
``RemoteEngine`` stands in for the ``RolloutEngine`` of a colocated run, so the recipes do not change:

- ``generate`` is collective over the learner ranks: the leader (global rank 0) gathers every learner's
  prompts and per-prompt seeds, splits them contiguously over the rollout ranks, collects their samples in
  order and hands each learner its own. Seeds are per prompt, so samples do not depend on the split.
- ``load_buckets`` (weight sync): every learner takes part in the (ZeRO-3) gathers; the leader sends each
  bucket to every rollout rank as one flat byte buffer plus a header (names, dtypes, shapes), and the rollout
  rank feeds vLLM's in-place reload straight from that buffer. Extra memory: one bucket on each side.

Transport: point-to-point messages over a gloo group of the leader and the rollout ranks (pickled requests
and answers, raw bytes for weights; on GPU learners the bucket is staged through CPU memory).

Fault policy: the leader waits at most ``rollout.timeout`` seconds for each answer. A rollout rank that dies
(its connection closes) or stays silent longer stops the run with ``RolloutRankFailed``, a one-line message
naming the rank, what it was doing and the last intact checkpoint, printed at once (torchrun stops the
remaining processes moments after a worker dies).
"""

from __future__ import annotations

import logging
import math
import pickle
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from posttrain.distributed import DistInfo, rollout_group
from posttrain.errors import RolloutRankFailed, UserError, print_user_error
from posttrain.rollout.batches import merge_batches, shares, split_batch
from posttrain.rollout.config import RolloutConfig
from posttrain.rollout.engine import RolloutBatch
from posttrain.rollout.layout import Layout
from posttrain.rollout.protocol import Bucket

log = logging.getLogger("posttrain")

_TAG = 17
_ALIGN = 16  # byte alignment of each tensor in a bucket buffer, so any dtype can view its slice


@dataclass
class _Link:
    """One end of the leader <-> rollout-rank group: pickled objects and raw byte buffers, point to point."""

    group: Any  # torch ProcessGroupGloo
    members: list[int]  # global ranks; members[0] is the leader

    def send(self, obj: Any, member: int, timeout: timedelta | None = None) -> None:
        data = pickle.dumps(obj)
        self.send_bytes(torch.tensor([len(data)], dtype=torch.int64), member, timeout)
        self.send_bytes(torch.frombuffer(bytearray(data), dtype=torch.uint8), member, timeout)

    def recv(self, member: int, timeout: timedelta | None = None) -> Any:
        size = torch.zeros(1, dtype=torch.int64)
        self.recv_bytes(size, member, timeout)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.recv_bytes(data, member, timeout)
        return pickle.loads(data.numpy().tobytes())

    def send_bytes(self, tensor: torch.Tensor, member: int, timeout: timedelta | None = None) -> None:
        work = self.group.send([tensor], member, _TAG)
        work.wait(timeout) if timeout is not None else work.wait()

    def recv_bytes(self, tensor: torch.Tensor, member: int, timeout: timedelta | None = None) -> None:
        work = self.group.recv([tensor], member, _TAG)
        work.wait(timeout) if timeout is not None else work.wait()

    def broadcast(self, obj: Any = None, timeout: timedelta | None = None) -> Any:
        """The leader's ``obj`` on every member (one collective over the group; members pass nothing)."""
        data = pickle.dumps(obj) if self.is_leader else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        self.broadcast_bytes(size, timeout)
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_leader else \
            torch.empty(int(size.item()), dtype=torch.uint8)
        self.broadcast_bytes(buffer, timeout)
        return obj if self.is_leader else pickle.loads(buffer.numpy().tobytes())

    def broadcast_bytes(self, tensor: torch.Tensor, timeout: timedelta | None = None) -> None:
        """The leader's ``tensor`` into every member's tensor of the same size, in one collective."""
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        work = self.group.broadcast([tensor], options)
        work.wait(timeout) if timeout is not None else work.wait()

    @property
    def is_leader(self) -> bool:
        return self.group.rank() == 0


def _link() -> _Link:
    found = rollout_group()
    if found is None:
        raise RuntimeError("no rollout group: init_distributed(rollout_ranks=...) was not called for a "
                           "disaggregated run")
    return _Link(*found)


# ---------------------------------------------------------------------------------------------- weights
def _pack(bucket: list[tuple[str, torch.Tensor]]) -> tuple[list[tuple[str, str, tuple[int, ...], int]], torch.Tensor]:
    """A bucket as a header ``(name, dtype, shape, byte offset)`` per tensor and one flat CPU byte buffer."""
    header, offset = [], 0
    for name, tensor in bucket:
        header.append((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset))
        offset += math.ceil(tensor.numel() * tensor.element_size() / _ALIGN) * _ALIGN
    flat = torch.empty(offset, dtype=torch.uint8)
    for (_, _, _, start), (_, tensor) in zip(header, bucket):
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        flat[start : start + raw.numel()].copy_(raw)  # copies from the GPU too
    return header, flat


def _unpack(header, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views into ``flat`` (no copy), one per header entry."""
    for name, dtype, shape, start in header:
        dt = getattr(torch, dtype)
        nbytes = math.prod(shape) * torch.empty(0, dtype=dt).element_size()
        yield name, flat[start : start + nbytes].view(dt).view(shape)


# ---------------------------------------------------------------------------------------------- learner side
class RemoteEngine:
    """The learner ranks' handle on the rollout ranks; used where a colocated run uses its ``RolloutEngine``
    (an ``Engine``, ``posttrain.rollout.protocol``).

    ``generate``, ``submit`` / ``collect`` and ``load_buckets`` are collective over the learner ranks (every
    learner calls them, also with no prompts); only the leader talks to the rollout ranks.
    """

    collective = True
    # Adapter-only LoRA sync to rollout ranks is not implemented: with rollout.lora_sync auto a LoRA learner
    # merges its adapter and streams full buckets; 'adapter' is refused with this reason.
    lora_enabled = False

    def __init__(self, dist: DistInfo, cfg: RolloutConfig, output_dir: str | Path) -> None:
        self.dist, self.cfg = dist, cfg
        # Rollout rank i (bridge member i + 1) is a shard of engine i // tensor_parallel_size.
        self.layout = Layout(cfg.ranks, cfg.tensor_parallel_size)
        self.output_dir = Path(output_dir)
        self.timeout = timedelta(seconds=cfg.timeout)
        self.link = _link() if dist.is_main else None
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.failed = False
        self.pending: Any = None  # a submitted generate: (n, prompts per learner), or the leader's error
        if self.link is not None:
            self._wait_ready()

    def _wait_ready(self) -> None:
        """Every rollout rank reports its engine up (or why not) within ``rollout.start_timeout``."""
        for member in range(1, len(self.link.members)):
            status, value = self._guard(member, "starting its engine",
                                        lambda m=member: self.link.recv(m, timedelta(seconds=self.cfg.start_timeout)),
                                        self.cfg.start_timeout, "rollout.start_timeout")
            if status != "ok":
                self._fail(member, "starting its engine", value)

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence, *, n: int | None = None, seed: int | None = None,
                 seeds: Sequence[int] | None = None, **sampling) -> RolloutBatch:
        """This learner's prompts sampled on the rollout ranks; arguments as ``RolloutEngine.generate``."""
        self.submit(prompts, n=n, seed=seed, seeds=seeds, **sampling)
        return self.collect()

    def submit(self, prompts: Sequence, *, n: int | None = None, seed: int | None = None,
               seeds: Sequence[int] | None = None, **sampling) -> None:
        """Start a ``generate`` on the rollout ranks without waiting for it; ``collect`` returns its result.

        Collective over the learners. The rollout ranks work through requests in order, so the learners may
        train meanwhile (``rollout.schedule=one_step_async``); ``collect`` must come before the next request.
        """
        import torch.distributed as dist

        if self.pending is not None:
            raise RuntimeError("RemoteEngine.submit: the previous generate was not collected")
        n = self.cfg.n if n is None else n
        if seeds is None and seed is not None:
            seeds = [seed + i * n for i in range(len(prompts))]
        mine = (list(prompts), None if seeds is None else list(seeds))
        gathered = [None] * self.dist.world_size if self.dist.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        self.pending = (n, [len(ps) for ps, _ in gathered]) if self.dist.is_main else (n, None)
        if self.dist.is_main:
            sent = self._leader(lambda: self._send_generate(gathered, n, sampling))
            if isinstance(sent, BaseException):
                self.pending = sent

    def collect(self) -> RolloutBatch:
        """The samples of the submitted ``generate`` (waits for them, at most ``rollout.timeout`` per answer)."""
        import torch.distributed as dist

        if self.pending is None:
            raise RuntimeError("RemoteEngine.collect: nothing was submitted")
        pending, self.pending = self.pending, None
        parts: list = [None] * self.dist.world_size
        if self.dist.is_main:
            parts = pending if isinstance(pending, BaseException) else self._leader(lambda: self._receive(*pending))
            if isinstance(parts, BaseException):
                parts = [parts] * self.dist.world_size
        received: list = [None]
        dist.scatter_object_list(received, parts if self.dist.is_main else None, src=0)
        return _raise_if_error(received[0])

    def _send_generate(self, gathered, n: int, sampling: dict) -> None:
        """Every engine its contiguous share of the prompts; every shard of an engine the same request
        (an engine with no share still takes part: data-parallel engines step together)."""
        prompts = [p for ps, _ in gathered for p in ps]
        # Without seeds every learner's seeds would be None: the rollout ranks' engines then derive their own.
        seeds = None if any(s is None for _, s in gathered) else [x for _, s in gathered for x in s]
        start = 0
        for engine, count in enumerate(shares(len(prompts), self.layout.engines)):
            chunk = slice(start, start + count)
            request = ("generate", {"prompts": prompts[chunk], "n": n, "sampling": sampling,
                                    "seeds": None if seeds is None else seeds[chunk]})
            for member in self._members(engine):
                self._guard(member, "generating", lambda m=member, r=request: self.link.send(r, m, self.timeout))
            start += count

    def _members(self, engine: int) -> list[int]:
        """Bridge members (1..R) holding the shards of one engine."""
        return [rank + 1 for rank in self.layout.members(engine)]

    def _receive(self, n: int, counts: list[int]) -> list[RolloutBatch]:
        batches = []
        for engine in range(self.layout.engines):
            members = self._members(engine)
            answers = [self._answer(member, "generating") for member in members]
            for member, other in zip(members[1:], answers[1:]):
                if [s.completion_ids for s in other] != [s.completion_ids for s in answers[0]]:
                    self.failed = True
                    raise self._report(RolloutRankFailed(
                        f"rollout rank {self.link.members[member]} sampled other tokens than rank "
                        f"{self.link.members[members[0]]}, a shard of the same tensor-parallel engine; "
                        f"{self._checkpoint_note()}"))
            batches.append(answers[0])
        return split_batch(merge_batches(batches, n), counts)

    # ---- weights -------------------------------------------------------------------------------
    def load_buckets(self, buckets: Iterable[Bucket], stats=None, *, adapter_base: bool = False) -> None:
        """Send every bucket to every rollout rank, which loads it into its engine; collective over learners
        (the caller, ``sync_weights``, drains the bucket stream on the other learners). ``stats``: gets the
        largest growth a rollout rank measured. No adapter syncs (``lora_enabled`` is False), so no
        ``adapter_base``."""
        import torch.distributed as dist

        if adapter_base:
            raise NotImplementedError("adapter-only LoRA sync to rollout ranks is not implemented")
        outcome = self._leader(lambda: self._send_weights(buckets)) if self.dist.is_main else None
        for _ in buckets:  # every learner finishes the collective gathers before the verdict is shared
            pass
        received = [outcome]
        dist.broadcast_object_list(received, src=0)
        reports = _raise_if_error(received[0])
        if stats is not None and reports:
            peaks = [r["peak_bytes"] for r in reports if r.get("peak_bytes") is not None]
            stats.remote_peak_bytes = max(peaks) if peaks else None

    def _send_weights(self, buckets: Iterable[Bucket]) -> list[dict]:
        """Each bucket goes out once, as one broadcast over the bridge group, and reaches every shard of every
        engine (each shard's vLLM loader keeps its slice)."""
        ranks = range(1, len(self.link.members))
        doing = "loading weights"
        self._each(ranks, doing, lambda m: self.link.send(("load", None), m, self.timeout))
        for bucket in buckets:
            header, flat = _pack(bucket)
            del bucket
            self._guard(None, doing, lambda header=header, flat=flat: self._broadcast_bucket(header, flat))
            del flat
        self._guard(None, doing, lambda: self.link.broadcast(("end", None), self.timeout))
        return [self._answer(m, doing) for m in ranks]

    def _broadcast_bucket(self, header: list, flat: torch.Tensor) -> None:
        self.link.broadcast(("bucket", header), self.timeout)
        self.link.broadcast_bytes(flat, self.timeout)

    # ---- the rest of the Engine protocol -------------------------------------------------------
    def sleep(self, level: int | None = None) -> None:
        """Nothing to free: the engines live on other ranks."""

    def close(self) -> None:
        """Tell the rollout ranks to shut down (not after a failure: a dead or stuck rank would not listen)."""
        if self.link is None or self.failed:
            return
        if isinstance(self.pending, tuple):  # a prefetch still in flight: take its answers, or stop would wait
            for member in range(1, len(self.link.members)):
                try:
                    self.link.recv(member, self.timeout)
                except RuntimeError as err:
                    log.warning("rollout rank %d did not finish its last generate: %s", self.link.members[member], err)
            self.pending = None
        for member in range(1, len(self.link.members)):
            try:
                self.link.send(("stop", None), member, timedelta(seconds=min(self.cfg.timeout, 30)))
            except RuntimeError as err:
                log.warning("rollout rank %d did not take the stop request: %s", self.link.members[member], err)
        self.link = None

    # ---- leader helpers ------------------------------------------------------------------------
    def _leader(self, work) -> Any:
        """Run ``work`` on the leader; a user error becomes the result every learner raises."""
        try:
            return work()
        except UserError as err:
            return err

    def _each(self, members: Iterable[int], doing: str, action) -> None:
        for member in members:
            self._guard(member, doing, lambda m=member: action(m))

    def _answer(self, member: int, doing: str) -> Any:
        status, value = self._guard(member, doing, lambda: self.link.recv(member, self.timeout))
        if status == "ok":
            return value
        self._fail(member, doing, value)

    def _fail(self, member: int, doing: str, error: Any) -> None:
        """Raise what a rollout rank answered instead of a result."""
        if isinstance(error, UserError):  # e.g. a prompt too long for rollout.max_model_len: the rank is fine
            raise error
        self.failed = True
        rank = self.link.members[member]
        raise self._report(RolloutRankFailed(f"rollout rank {rank} failed while {doing}: {error}; "
                                             f"{self._checkpoint_note()}"))

    def _guard(self, member: int | None, doing: str, action, limit: float | None = None,
               setting: str = "rollout.timeout") -> Any:
        """``action()``; a broken connection or a timeout becomes ``RolloutRankFailed`` naming the rank."""
        try:
            return action()
        except RuntimeError as err:
            self.failed = True
            if member is None:  # a broadcast to them all: gloo does not say which one failed
                who = "one of the rollout ranks " + ", ".join(str(r) for r in self.link.members[1:])
            else:
                who = f"rollout rank {self.link.members[member]}"
            text = str(err)
            if "timed out" in text.lower():
                limit = self.cfg.timeout if limit is None else limit
                what = f"did not answer within {setting}={limit:g} s while {doing}"
            else:
                what = f"died while {doing} (its connection closed)"
            raise self._report(RolloutRankFailed(f"{who} {what}; {self._checkpoint_note()}")) from None

    def _checkpoint_note(self) -> str:
        from posttrain.checkpoint import list_complete

        complete = list_complete(self.output_dir / "checkpoints")
        if not complete:
            return "the run stopped before its first checkpoint."
        return f"the run stopped; the last intact checkpoint is {complete[-1]} (continue with resume=auto)."

    @staticmethod
    def _report(err: RolloutRankFailed) -> RolloutRankFailed:
        print_user_error(err)  # now: torchrun may stop this process moments after a worker died
        return err


def _raise_if_error(value: Any) -> Any:
    if isinstance(value, BaseException):
        raise value
    return value


# ---------------------------------------------------------------------------------------------- rollout side
def serve(cfg, dist: DistInfo) -> None:
    """A rollout rank's whole life: start the engine, answer the leader's requests until it says stop."""
    from posttrain.faults import maybe_fail_rollout
    from posttrain.models.loading import load_tokenizer
    from posttrain.rollout.engine import RolloutEngine

    link = _link()
    engine, startup_error = None, None
    try:
        tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
        engine = RolloutEngine(cfg.rollout.model or cfg.model.path, cfg.rollout, tokenizer=tokenizer)
    except Exception as err:  # the leader stops the run with it
        startup_error = err
    try:
        link.send(_picklable(("error", startup_error) if startup_error else ("ok", None)), 0)
    except RuntimeError:
        pass  # the leader is gone already
    requests = 0
    try:
        while True:
            try:
                kind, payload = link.recv(0)  # as long as the learners take between requests
            except RuntimeError as err:  # the leader is gone; it (or torchrun) reports why
                log.warning("rollout rank %d: the learners went away; stopping", dist.global_rank)
                log.debug("rollout rank %d: %s", dist.global_rank, err)
                return
            if kind == "stop":
                return
            requests += 1
            maybe_fail_rollout(requests)
            answer = ("error", startup_error) if startup_error else _handle(engine, link, kind, payload)
            link.send(_picklable(answer), 0)
    finally:
        if engine is not None:
            engine.close()


def _handle(engine, link: _Link, kind: str, payload: Any) -> tuple[str, Any]:
    if kind == "load":
        return _load(engine, link)
    try:
        if kind == "generate":
            batch = engine.generate(payload["prompts"], n=payload["n"], seeds=payload["seeds"], **payload["sampling"])
            return "ok", batch
        raise RuntimeError(f"unknown request {kind!r}")
    except Exception as err:
        return "error", err


def _load(engine, link: _Link) -> tuple[str, Any]:
    """Receive buckets until the end marker and stream them into the engine; report time and memory."""
    from posttrain.rollout.memory import PeakMemory

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        while True:
            kind, header = link.broadcast()
            if kind == "end":
                return
            flat = torch.empty(header[-1][3] + _nbytes(header[-1]) if header else 0, dtype=torch.uint8)
            link.broadcast_bytes(flat)
            yield from _unpack(header, flat)
            del flat

    start = time.perf_counter()
    pairs = stream()
    try:
        with PeakMemory(engine.device) as meter:
            engine.load_weights(pairs)
    except Exception as err:
        for _ in pairs:  # keep to the protocol: the leader is still sending
            pass
        return "error", err
    for _ in pairs:
        pass
    return "ok", {"seconds": time.perf_counter() - start, "peak_bytes": meter.peak_extra_bytes}


def _nbytes(entry) -> int:
    _, dtype, shape, _ = entry
    size = math.prod(shape) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return math.ceil(size / _ALIGN) * _ALIGN


def _picklable(answer: tuple[str, Any]) -> tuple[str, Any]:
    """Errors travel as themselves when they pickle (a UserError keeps its message), else as text."""
    status, value = answer
    if status == "error":
        try:
            pickle.dumps(value)
        except Exception:
            value = f"{type(value).__name__}: {value}"
    return status, value
