"""Supervised fine-tuning (SFT) recipe.

Supports:
  - data as ``messages``, ``prompt`` + ``completion`` (strings or conversational) or ``text``;
    loss only on assistant / completion tokens; optional packing
  - DeepSpeed ZeRO 0-3, fp32 or bf16, gradient accumulation and clipping, warmup + cosine/linear
  - PEFT LoRA (``model.lora.enabled=true``)
  - 1..N processes under torchrun: the same global batch gives the same update
  - checkpoints every N steps; ``resume=auto`` continues mid-epoch with identical losses

Assumes:
  - a causal LM with a fast tokenizer (and a chat template for conversational data)

The loss of an optimizer step is the mean token cross-entropy over the whole
global batch: each micro-batch contributes its token-loss *sum* divided by the
global number of trainable tokens, so the split into ranks and accumulation
steps does not change the update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.data.formats import sft_kind
from posttrain.data.pipeline import load_examples
from posttrain.data.tokenize import (
    IGNORE,
    LengthReport,
    TokenizedExample,
    collate,
    fit_length,
    pack_examples,
    sft_example,
)
from posttrain.distributed import DistInfo, all_reduce_sum
from posttrain.faults import maybe_poison_loss
from posttrain.trainers import offline
from posttrain.trainers.common import RecipeConfig, global_sums
from posttrain.trainers.harness import RunHarness, run_identity
from posttrain.trainers.loop import train_loop
from posttrain.trainers.policy import build_policy

log = logging.getLogger("posttrain")


@dataclass
class Config(RecipeConfig):
    """The SFT recipe: only the shared sections."""


def prepare_data(cfg: Config, tokenizer) -> tuple[list[TokenizedExample], list[TokenizedExample], LengthReport, dict]:
    """Load, check, tokenise, length-filter and (optionally) pack the train and eval sets; also the count of
    invalid rows skipped."""
    def encode(row, report: LengthReport):
        return fit_length(sft_example(tokenizer, row), cfg.data.max_length, cfg.data.overlong, row.where, report)

    train, evaluation, report, skipped = load_examples(cfg.data, cfg.seed, sft_kind, encode)
    if cfg.data.packing:
        train = pack_examples(train, cfg.data.max_length)
        evaluation = pack_examples(evaluation, cfg.data.max_length)
    return train, evaluation, report, skipped


def preflight(cfg: Config, world_size: int, source: str) -> None:
    """Everything that can fail on user input, checked before processes or directories are made."""
    offline.preflight(cfg, world_size, source, lambda tok: prepare_data(cfg, tok), "training examples")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over positions whose label is not IGNORE."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE, reduction="sum",
    )


def count_targets(examples: list[TokenizedExample]) -> int:
    """Predicted tokens: trainable labels after the first position (which has no context)."""
    return sum(sum(1 for label in e.labels[1:] if label != IGNORE) for e in examples)


class Recipe:
    def __init__(self, cfg: Config, dist: DistInfo, source: str = "the recipe") -> None:
        self.cfg, self.dist, self.source = cfg, dist, source

    def setup(self) -> None:
        cfg = self.cfg
        self.data = offline.setup_data(cfg, self.dist, self.source, lambda tok: prepare_data(cfg, tok))
        self.tokenizer, self.train_set, self.eval_set = self.data.tokenizer, self.data.train_set, self.data.eval_set
        self.total_steps = self.data.total_steps
        self.learner = build_policy(cfg, self.dist, self.data.grad_accum, self.total_steps)
        self.run = RunHarness(cfg, self.dist, run_identity(cfg))
        self.run.restore(self.learner)
        self.run.open_metrics()

    def train(self) -> dict:
        def summary(start: dict, end: dict) -> dict:
            return {"eval_loss_start": start.get("loss"), "eval_loss_end": end.get("loss")}

        return train_loop(self.cfg, self.dist, self.run, self.total_steps, self.train_step, self.evaluate, self.save,
                          [["loss", "eval_loss"], ["lr"], ["grad_norm"]], eval_prefix="eval_", summary=summary)

    def save(self, done: int) -> None:
        self.run.save(done, self.learner, self.tokenizer, state={"total_steps": self.total_steps})

    def batch_losses(self, examples: list[TokenizedExample], step: int) -> tuple[torch.Tensor, dict]:
        """The micro-batch's summed token loss (one unit: the loss is per target token) and its sum."""
        batch = collate(examples, self.tokenizer.pad_token_id)
        logits = self.learner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        summed = maybe_poison_loss(step + 1, token_loss_sum(logits, batch["labels"]))
        return summed[None], {"loss": summed.detach()}

    def train_step(self, step: int) -> dict:
        dist = self.dist
        micro_batches = offline.micro_batch_ids(self.data, step, dist, self.cfg.train.micro_batch_size)
        local_targets = sum(count_targets([self.train_set[i] for i in ids]) for ids in micro_batches)
        global_targets, = all_reduce_sum([local_targets])
        # the gradient of (sum of token losses) / (global token count)
        sums = offline.optimizer_step(self.learner, self.data, micro_batches,
                                      lambda examples, _ids: self.batch_losses(examples, step), global_targets,
                                      dist.world_size)
        total_loss, = all_reduce_sum([sums["loss"]])
        metrics = {"loss": total_loss / global_targets, "tokens": int(global_targets),
                   "epoch": step / self.data.sampler.steps_per_epoch}
        return offline.step_metrics(metrics, self.learner, step, self.run.last_checkpoint)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted mean loss on the eval set, sharded over ranks."""
        if not self.eval_set:
            return {}

        def stats(examples, _indices, _real):
            batch = collate(examples, self.tokenizer.pad_token_id)
            logits = self.learner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return {"loss": token_loss_sum(logits, batch["labels"]), "targets": torch.tensor(count_targets(examples))}

        sums, _ = offline.evaluation_sums(self.learner, self.data, self.dist, self.cfg.train.eval_batch_size, stats)
        totals = global_sums(sums)
        return {"loss": totals["loss"] / max(totals["targets"], 1)}
