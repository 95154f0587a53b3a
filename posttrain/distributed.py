"""Process-group setup shared by every recipe (SPMD: each rank runs the same program).

Under torchrun the usual environment variables are set; run directly, we make
a world of one so the same code path (DeepSpeed, collectives) is exercised.

Disaggregated placement (``rollout.placement=disaggregated``) splits the torchrun
world by role: the first ranks are *learners* and the last ``rollout.ranks`` ranks
are *rollout* ranks. torch's default process group then spans the learners only
(DeepSpeed, ZeRO and every collective of a recipe see just them, so global rank 0
is the learner that writes checkpoints and metrics); rollout ranks have no default
group of ours (their vLLM engine makes its own world of one). The learner ranks'
leader (global rank 0) and the rollout ranks talk over a separate gloo group,
``posttrain.rollout.remote.Bridge``, built on the same rendezvous store.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal


def configure_environment() -> None:
    """Defaults that must be set before torch/DeepSpeed/vLLM are imported."""
    if not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


Role = Literal["colocated", "learner", "rollout"]


@dataclass(frozen=True)
class DistInfo:
    """This rank's place. ``rank``/``world_size`` count the ranks of its role's world: every rank when
    colocated, the learner ranks on a learner, the rollout ranks on a rollout rank."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    role: Role = "colocated"
    global_rank: int = 0
    global_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The rank that logs, writes metrics and checkpoints: global rank 0 (always a learner)."""
        return self.rank == 0 and self.role != "rollout"

    @property
    def rollout_ranks(self) -> list[int]:
        """Global ranks of the rollout ranks (empty when colocated)."""
        if self.role == "colocated":
            return []
        learners = self.world_size if self.role == "learner" else self.global_world_size - self.world_size
        return list(range(learners, self.global_world_size))


# Disaggregated runs: the gloo group of the learners' leader (member 0) and the rollout ranks (members 1..R),
# with its members' global ranks; None elsewhere. posttrain.rollout.remote talks over it.
_ROLLOUT_GROUP: tuple[Any, list[int]] | None = None
# Its default timeout only bounds how long a rollout rank waits for the learners' next request (they may train
# for a long time); the leader waits for answers with rollout.timeout, per operation.
_ROLLOUT_GROUP_TIMEOUT = timedelta(days=7)


def rollout_group() -> tuple[Any, list[int]] | None:
    """``(gloo process group, global ranks of its members)`` on the leader and rollout ranks; else None."""
    return _ROLLOUT_GROUP


def init_distributed(rollout_ranks: int = 0, tensor_parallel_size: int = 1) -> DistInfo:
    """Initialise torch.distributed (gloo on CPU, NCCL on GPU) once; return this rank's place.

    ``rollout_ranks > 0`` (disaggregated placement): the last ``rollout_ranks`` ranks become rollout ranks
    and the default process group spans only the learner ranks (see the module docstring). With
    ``tensor_parallel_size > 1`` the rollout ranks get a default group of their own, which their vLLM engines
    (``external_launcher``, ``tensor_parallel_size`` ranks each) take as their world.
    """
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if rollout_ranks:
        return _init_disaggregated(rollout_ranks, backend, local_rank, tensor_parallel_size)
    if not dist.is_initialized():
        import deepspeed

        if int(os.environ["WORLD_SIZE"]) == 1:
            # A world of one needs no rendezvous: an in-memory store avoids binding MASTER_PORT, which another
            # process may have taken since free_port() released it (EADDRINUSE on a busy machine).
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, backend, "colocated", rank, world)


def _init_disaggregated(rollout_ranks: int, backend: str, local_rank: int, tensor_parallel_size: int = 1) -> DistInfo:
    """Learner ranks get a default group of their own; rollout ranks one of theirs when their engines span
    several ranks (else none: a one-rank engine makes its own). The leader and the rollout ranks join their
    bridge group first, all at start."""
    global _ROLLOUT_GROUP
    import torch
    import torch.distributed as dist

    store, rank, world = next(dist.rendezvous("env://"))
    learners = world - rollout_ranks
    members = [0, *range(learners, world)]
    if rank in members:
        group = dist.ProcessGroupGloo(dist.PrefixStore("posttrain/rollout", store), members.index(rank),
                                      len(members), _ROLLOUT_GROUP_TIMEOUT)
        _ROLLOUT_GROUP = (group, members)
    if rank >= learners:
        if tensor_parallel_size > 1:
            # vLLM's external launcher reads its place from RANK and WORLD_SIZE: the rollout ranks' world.
            os.environ.update(RANK=str(rank - learners), WORLD_SIZE=str(rollout_ranks), POSTTRAIN_GLOBAL_RANK=str(rank))
            dist.init_process_group(backend, store=dist.PrefixStore("posttrain/rollouts", store),
                                    rank=rank - learners, world_size=rollout_ranks)
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
        return DistInfo(rank - learners, rollout_ranks, local_rank, backend, "rollout", rank, world)
    # Learner ranks are the first ones, so their group rank is their global rank.
    dist.init_process_group(backend, store=dist.PrefixStore("posttrain/learners", store), rank=rank,
                            world_size=learners)
    os.environ["WORLD_SIZE"] = str(learners)  # DeepSpeed reads it in places; the learner world is its world
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    return DistInfo(rank, learners, local_rank, backend, "learner", rank, world)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over ranks (float64 so counts stay exact)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum of a few floats over ranks (negate for a minimum)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.cpu().tolist()


def all_gather_rows(tensor):
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (the same shape on every rank).

    Each rank holds a contiguous share of a step's prompts, so rank order is the one-process order: a
    statistic of the gathered tensor is the one a single process computes."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    local = tensor.detach().to(torch.float64)
    if dist.get_backend() == "nccl":
        local = local.cuda()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts).to(device=tensor.device, dtype=tensor.dtype)


def own_rows(everyone, count: int, rank: int):
    """This rank's ``count`` rows of a tensor computed on ``all_gather_rows``' concatenation (rank order)."""
    return everyone[rank * count : (rank + 1) * count]


def all_gather_objects(values: list) -> list:
    """Concatenate every rank's list of picklable values, in rank order."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(values))
    return [value for part in parts for value in part]


def broadcast_object(value, src: int = 0):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
