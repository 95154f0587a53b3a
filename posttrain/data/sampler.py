"""Deterministic, resumable global batches.

The order of examples depends only on (seed, epoch), never on the number of
processes: global batch ``s`` holds the same examples whether one process
accumulates it in micro-batches or several processes split it. That is what
makes 1-process and N-process runs comparable, and resuming exact: the
position in the data is just the step number.
"""

from __future__ import annotations

import torch


class GlobalBatchSampler:
    """Index lists for every (step, rank, micro-batch) of a run.

    ``steps_per_epoch`` drops the last incomplete global batch of each epoch
    (reported by the trainer) so every optimizer step sees the same number of
    examples.
    """

    def __init__(self, num_examples: int, global_batch_size: int, *, seed: int, shuffle: bool = True) -> None:
        if num_examples < global_batch_size:
            raise ValueError(f"{num_examples} examples are fewer than one global batch of {global_batch_size}")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._cached_epoch: int | None = None
        self._order: list[int] = []

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    @property
    def dropped_per_epoch(self) -> int:
        return self.num_examples - self.steps_per_epoch * self.global_batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        if self._cached_epoch != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._order = torch.randperm(self.num_examples, generator=generator).tolist()
            else:
                self._order = list(range(self.num_examples))
            self._cached_epoch = epoch
        return self._order

    def global_batch(self, step: int) -> list[int]:
        """Indices of global batch ``step`` (0-based, counted across epochs)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        start = within * self.global_batch_size
        return order[start : start + self.global_batch_size]

    def micro_batches(self, step: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
        """This rank's contiguous share of global batch ``step``, cut into micro-batches."""
        batch = self.global_batch(step)
        share = len(batch) // world_size
        mine = batch[rank * share : (rank + 1) * share]
        return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
