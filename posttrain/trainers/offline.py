"""The parts every offline recipe (SFT, DPO family, KTO, RM, PRM) shares: data and sampler setup, the checks
before launch, the policy and reference models, one optimizer step and the sharded evaluation.

A recipe supplies its data loader and its batch-to-losses function; the step's gradient is that of
``sum of per-unit losses / denominator`` over the global batch (units: pairs, examples, lists, or SFT's target
tokens), whatever its split into ranks and micro-batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.config.schema import check_batch_sizes
from posttrain.data.sampler import GlobalBatchSampler
from posttrain.distributed import DistInfo, all_reduce_sum
from posttrain.errors import DataError
from posttrain.models.loading import check_model_path, load_tokenizer
from posttrain.trainers.common import (
    RecipeConfig,
    accumulate_sums,
    check_finite_loss,
    check_output_dir,
    eval_batches,
    seed_everything,
)
from posttrain.trainers.reference import eval_mode

log = logging.getLogger("posttrain")

# (examples, their dataset indices) -> (per-unit losses [U] with a graph, per-unit statistics to sum)
BatchLosses = Callable[[list, list[int]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class OfflineData:
    """Tokenised data, the global-batch sampler and the loop length of an offline run."""

    tokenizer: Any
    train_set: list
    eval_set: list
    report: Any
    skipped: Any
    sampler: GlobalBatchSampler
    total_steps: int
    grad_accum: int


def preflight(cfg: RecipeConfig, world_size: int, source: str, load: Callable[[Any], tuple], unit: str,
              extra_paths: Sequence[str | None] = ()) -> list:
    """Everything that can fail on user input, checked before processes or directories are made; the train set."""
    check_model_path(cfg.model.path)
    for path in extra_paths:
        if path:
            check_model_path(path)
    check_batch_sizes(cfg.train, world_size, source)
    check_output_dir(cfg)
    train = load(load_tokenizer(cfg.model, cfg.data.chat_template))[0]
    if len(train) < cfg.train.global_batch_size:
        raise DataError(f"{cfg.data.path}: {len(train)} valid {unit} are fewer than one global batch "
                        f"(train.global_batch_size={cfg.train.global_batch_size}).")
    return train


def setup_data(cfg: RecipeConfig, dist: DistInfo, source: str, load: Callable[[Any], tuple],
               unit: str = "examples") -> OfflineData:
    """Seed, check the output directory and batch sizes, load the tokenizer and ``load(tokenizer)`` ->
    (train, eval, report, skipped), and plan the steps."""
    seed_everything(cfg.seed)
    check_output_dir(cfg)
    grad_accum = check_batch_sizes(cfg.train, dist.world_size, source)
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    train_set, eval_set, report, skipped = load(tokenizer)
    sampler = GlobalBatchSampler(len(train_set), cfg.train.global_batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
    total_steps = cfg.train.max_steps or cfg.train.epochs * sampler.steps_per_epoch
    log.info("data: %d train / %d eval %s; %s; invalid rows skipped: %s; %d steps of %d (%d left over per epoch)",
             len(train_set), len(eval_set), unit, report.summary(), skipped or "none", total_steps,
             cfg.train.global_batch_size, sampler.dropped_per_epoch)
    return OfflineData(tokenizer, train_set, eval_set, report, skipped, sampler, total_steps, grad_accum)


def micro_batch_ids(data: OfflineData, step: int, dist: DistInfo, micro_batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of dataset indices for ``step``."""
    return list(data.sampler.micro_batches(step, dist.rank, dist.world_size, micro_batch_size))


def optimizer_step(learner, data: OfflineData, micro_batches: list[list[int]], batch_losses: BatchLosses,
                   denominator: float, world_size: int) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; this rank's sums of the per-unit statistics.

    DeepSpeed divides by the accumulation steps and averages over ranks; the scale undoes both, so the gradient
    is that of (sum of every rank's per-unit losses) / ``denominator``."""
    learner.train()
    scale = data.grad_accum * world_size / denominator
    sums: dict[str, float] = {}
    for ids in micro_batches:
        losses, stats = batch_losses([data.train_set[i] for i in ids], ids)
        learner.backward(losses.sum() * scale)
        learner.step()
        accumulate_sums(sums, {k: v.detach() for k, v in stats.items()})
    return sums


def step_metrics(metrics: dict[str, float], learner, step: int, last_checkpoint) -> dict[str, float]:
    """Add the learning rate and gradient norm, and stop on a non-finite loss (``step`` is 0-based)."""
    metrics["lr"] = learner.lr
    if learner.grad_norm is not None:
        metrics["grad_norm"] = learner.grad_norm
    check_finite_loss(metrics["loss"], step + 1, last_checkpoint)
    return metrics


@torch.no_grad()
def evaluation_sums(learner, data: OfflineData, dist: DistInfo, batch_size: int,
                    batch_stats: Callable[[list, list[int], bool], dict[str, torch.Tensor]]) -> tuple[dict, int]:
    """This rank's sums of ``batch_stats(examples, indices, real)`` over its share of the eval set, and the
    global count of examples. Ranks that run out repeat a batch (``real=False``, discarded) so ZeRO-3's gathers
    stay in step."""
    sums: dict[str, float] = {}
    count = 0
    shard_index = list(range(len(data.eval_set)))[dist.rank :: dist.world_size]
    with eval_mode(learner):
        for examples, real in eval_batches(data.eval_set, dist, batch_size):
            indices = shard_index[count : count + len(examples)] if real else [0] * len(examples)
            stats = batch_stats(examples, indices, real)
            for key in stats:  # every rank holds every key, even one whose batches were all padding
                sums.setdefault(key, 0.0)
            if real:
                count += len(examples)
                accumulate_sums(sums, stats)
    (total,) = all_reduce_sum([count])
    return sums, int(total)

