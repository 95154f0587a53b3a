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
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.config.schema import check_batch_sizes
from posttrain.data.formats import sft_kind
from posttrain.data.pipeline import load_examples
from posttrain.data.sampler import GlobalBatchSampler
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
from posttrain.errors import DataError
from posttrain.faults import maybe_kill, maybe_poison_loss
from posttrain.learner import build_learner
from posttrain.learner.engine import apply_lora
from posttrain.models.loading import check_model_path, load_causal_lm, load_tokenizer
from posttrain.trainers.common import (
    RecipeConfig,
    check_finite_loss,
    check_output_dir,
    eval_batches,
    seed_everything,
)
from posttrain.trainers.harness import RunHarness, progress_bar, run_identity, should_checkpoint

log = logging.getLogger("posttrain")


@dataclass
class Config(RecipeConfig):
    """The SFT recipe: only the shared sections."""


def prepare_data(cfg: Config, tokenizer) -> tuple[list[TokenizedExample], list[TokenizedExample], LengthReport]:
    """Load, check, tokenise, length-filter and (optionally) pack the train and eval sets."""
    def encode(row, report: LengthReport):
        return fit_length(sft_example(tokenizer, row), cfg.data.max_length, cfg.data.overlong, row.where, report)

    train, evaluation, report, skipped = load_examples(cfg.data, cfg.seed, sft_kind, encode)
    if skipped:
        log.info("invalid rows skipped: %s", skipped)
    if cfg.data.packing:
        train = pack_examples(train, cfg.data.max_length)
        evaluation = pack_examples(evaluation, cfg.data.max_length)
    return train, evaluation, report


def preflight(cfg: Config, world_size: int, source: str) -> None:
    """Everything that can fail on user input, checked before processes or directories are made."""
    check_model_path(cfg.model.path)
    check_batch_sizes(cfg.train, world_size, source)
    check_output_dir(cfg)
    train, _, _ = prepare_data(cfg, load_tokenizer(cfg.model, cfg.data.chat_template))
    if len(train) < cfg.train.global_batch_size:
        raise DataError(
            f"{cfg.data.path}: {len(train)} training examples are fewer than one global batch "
            f"(train.global_batch_size={cfg.train.global_batch_size})."
        )


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
        self.cfg = cfg
        self.dist = dist
        self.source = source

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        check_output_dir(cfg)
        self.grad_accum = check_batch_sizes(cfg.train, self.dist.world_size, self.source)
        self.tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
        self.train_set, self.eval_set, report = prepare_data(cfg, self.tokenizer)
        self.sampler = GlobalBatchSampler(len(self.train_set), cfg.train.global_batch_size, seed=cfg.seed,
                                          shuffle=cfg.data.shuffle)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.sampler.steps_per_epoch
        log.info("data: %d train / %d eval examples; %s; %d steps of %d examples (%d left over per epoch)",
                 len(self.train_set), len(self.eval_set), report.summary(), self.total_steps,
                 cfg.train.global_batch_size, self.sampler.dropped_per_epoch)
        self.learner = self._setup_learner()
        self.run = RunHarness(cfg, self.dist, run_identity(cfg))
        self.run.restore(self.learner)
        self.run.open_metrics()

    def _setup_learner(self):
        cfg = self.cfg
        model = load_causal_lm(cfg.model)
        if cfg.model.lora.enabled:
            model = apply_lora(model, cfg.model.lora)
        return build_learner(model, cfg.learner, world_size=self.dist.world_size,
                             micro_batch_size=cfg.train.micro_batch_size, grad_accum=self.grad_accum,
                             total_steps=self.total_steps)

    # ---------------------------------------------------------------- train
    def train(self) -> dict:
        cfg, run = self.cfg, self.run
        if run.start_step == 0:
            run.history["eval_loss_start"] = self.evaluate()
            run.log(0, {"eval_loss": run.history["eval_loss_start"]})
        progress = progress_bar(self.total_steps, run.start_step, self.dist.is_main and cfg.logging.progress)
        started = time.perf_counter()
        for step in range(run.start_step, self.total_steps):
            metrics = self.train_step(step)
            done = step + 1
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < self.total_steps:
                metrics["eval_loss"] = self.evaluate()
            if done == self.total_steps:
                metrics["eval_loss"] = run.history["eval_loss_end"] = self.evaluate()
            if done % cfg.train.log_every == 0 or "eval_loss" in metrics:
                run.log(done, metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
            if should_checkpoint(cfg, done, self.total_steps):
                run.save(done, self.learner, self.tokenizer, state={"total_steps": self.total_steps})
            maybe_kill(done)
        progress.close()
        start, end = run.history.get("eval_loss_start"), run.history.get("eval_loss_end")
        if self.dist.is_main and start is not None and end is not None:
            log.info("eval loss %.4f -> %.4f", start, end)
        return run.finish({"steps": self.total_steps, "eval_loss_start": start, "eval_loss_end": end,
                           "train_seconds": round(time.perf_counter() - started, 2)},
                          [["loss", "eval_loss"], ["lr"], ["grad_norm"]])

    def train_step(self, step: int) -> dict:
        cfg, dist = self.cfg, self.dist
        self.learner.train()
        micro_batches = [[self.train_set[i] for i in ids]
                         for ids in self.sampler.micro_batches(step, dist.rank, dist.world_size, cfg.train.micro_batch_size)]
        local_targets = sum(count_targets(mb) for mb in micro_batches)
        global_targets, = all_reduce_sum([local_targets])
        # DeepSpeed divides by accumulation steps and averages over ranks; undo both so the
        # step's gradient is that of (sum of token losses) / (global token count).
        scale = self.grad_accum * dist.world_size / global_targets
        loss_sum = 0.0
        for examples in micro_batches:
            batch = collate(examples, self.tokenizer.pad_token_id)
            logits = self.learner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            summed = maybe_poison_loss(step + 1, token_loss_sum(logits, batch["labels"]))
            self.learner.backward(summed * scale)
            self.learner.step()
            loss_sum += summed.item()
        total_loss, = all_reduce_sum([loss_sum])
        metrics = {"loss": total_loss / global_targets, "lr": self.learner.lr, "tokens": int(global_targets),
                   "epoch": step / self.sampler.steps_per_epoch}
        grad_norm = self.learner.grad_norm
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        check_finite_loss(metrics["loss"], step + 1, self.run.last_checkpoint)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted mean loss on the eval set, sharded over ranks."""
        if not self.eval_set:
            return None
        self.learner.eval()
        loss_sum, targets = 0.0, 0
        for examples, real in eval_batches(self.eval_set, self.dist, self.cfg.train.eval_batch_size):
            batch = collate(examples, self.tokenizer.pad_token_id)
            logits = self.learner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if real:
                loss_sum += token_loss_sum(logits, batch["labels"]).item()
                targets += count_targets(examples)
        total, count = all_reduce_sum([loss_sum, targets])
        return total / max(count, 1)
