"""Reward-model training (Bradley-Terry) on paired preferences.

Supports:
  - ``AutoModelForSequenceClassification`` (one score) from a causal LM checkpoint (new head) or an RM
  - Bradley-Terry loss with an optional per-pair ``margin`` column and reward centring
  - eval pairwise accuracy; DeepSpeed ZeRO 0-3, LoRA, 1..N processes, checkpoints and ``resume=auto``
  - the saved model is the ``orm`` reward of ``reward_models`` unchanged

Assumes:
  - paired data: ``prompt``, ``chosen``, ``rejected`` (strings or message lists), optional ``margin``

Training language models to follow instructions with human feedback (Ouyang et al., 2022);
Rank analysis of incomplete block designs: the method of paired comparisons (Bradley & Terry, 1952).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from posttrain import algorithms
from posttrain.config.schema import check_batch_sizes, doc
from posttrain.data.preference import PreferenceExample, collate_preference, load_pairs
from posttrain.data.sampler import GlobalBatchSampler
from posttrain.distributed import DistInfo, all_reduce_sum
from posttrain.errors import DataError
from posttrain.faults import maybe_kill
from posttrain.learner import build_learner
from posttrain.learner.engine import apply_lora
from posttrain.models.heads import load_scoring_model
from posttrain.models.loading import check_model_path, load_tokenizer
from posttrain.trainers.common import (
    RecipeConfig,
    accumulate_sums,
    check_output_dir,
    eval_batches,
    global_means,
    seed_everything,
)
from posttrain.trainers.harness import RunHarness, progress_bar, run_identity, should_checkpoint
from posttrain.trainers.reference import eval_mode

log = logging.getLogger("posttrain")


@dataclass
class RMSettings:
    use_margin: bool = doc(True, "Use the data's `margin` column when present: loss = -log sigmoid(r_c - r_r - margin).")
    center_coefficient: float = doc(0.0, "Reward centring: adds coef * mean((r_c + r_r)^2) (Eisenstein et al., 2023).")


@dataclass
class Config(RecipeConfig):
    rm: RMSettings = field(default_factory=RMSettings, metadata={"help": "Reward-model loss settings."})


def preflight(cfg: Config, world_size: int, source: str) -> None:
    check_model_path(cfg.model.path)
    check_batch_sizes(cfg.train, world_size, source)
    check_output_dir(cfg)
    train, _, _, _ = load_pairs(cfg.data, cfg.seed, load_tokenizer(cfg.model, cfg.data.chat_template))
    if len(train) < cfg.train.global_batch_size:
        raise DataError(f"{cfg.data.path}: {len(train)} valid pairs are fewer than one global batch "
                        f"(train.global_batch_size={cfg.train.global_batch_size}).")


class Recipe:
    def __init__(self, cfg: Config, dist: DistInfo, source: str = "the recipe") -> None:
        self.cfg = cfg
        self.dist = dist
        self.source = source

    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        check_output_dir(cfg)
        self.grad_accum = check_batch_sizes(cfg.train, self.dist.world_size, self.source)
        self.tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
        self.train_set, self.eval_set, report, skipped = load_pairs(cfg.data, cfg.seed, self.tokenizer)
        self.sampler = GlobalBatchSampler(len(self.train_set), cfg.train.global_batch_size, seed=cfg.seed,
                                          shuffle=cfg.data.shuffle)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.sampler.steps_per_epoch
        log.info("data: %d train / %d eval pairs; %s; invalid rows skipped: %s; %d steps",
                 len(self.train_set), len(self.eval_set), report.summary(), skipped or "none", self.total_steps)
        model = load_scoring_model(cfg.model, "sequence", self.tokenizer.pad_token_id)
        if cfg.model.lora.enabled:
            model = apply_lora(model, cfg.model.lora)
        self.learner = build_learner(model, cfg.learner, world_size=self.dist.world_size,
                                     micro_batch_size=cfg.train.micro_batch_size, grad_accum=self.grad_accum,
                                     total_steps=self.total_steps)
        self.run = RunHarness(cfg, self.dist, run_identity(cfg, head="sequence"))
        self.run.history["skipped_rows"] = skipped
        self.run.restore(self.learner)
        self.run.open_metrics()

    def train(self) -> dict:
        cfg, run = self.cfg, self.run
        if run.start_step == 0:
            run.history["eval_start"] = self.evaluate()
            run.log(0, {f"eval/{k}": v for k, v in run.history["eval_start"].items()})
        progress = progress_bar(self.total_steps, run.start_step, self.dist.is_main and cfg.logging.progress)
        started = time.perf_counter()
        for step in range(run.start_step, self.total_steps):
            metrics = self.train_step(step)
            done = step + 1
            if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == self.total_steps:
                evaluation = self.evaluate()
                metrics.update({f"eval/{k}": v for k, v in evaluation.items()})
                if done == self.total_steps:
                    run.history["eval_end"] = evaluation
            if done % cfg.train.log_every == 0 or done == self.total_steps:
                run.log(done, metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
            if should_checkpoint(cfg, done, self.total_steps):
                run.save(done, self.learner, self.tokenizer, state={"total_steps": self.total_steps},
                         model_kind="sequence_classification")
            maybe_kill(done)
        progress.close()
        start, end = run.history.get("eval_start", {}), run.history.get("eval_end", {})
        if self.dist.is_main and end:
            log.info("eval pairwise accuracy %.3f -> %.3f", start.get("accuracy", math.nan), end.get("accuracy", math.nan))
        return run.finish({"steps": self.total_steps, "eval_start": start, "eval_end": end,
                           "skipped_rows": run.history.get("skipped_rows"),
                           "train_seconds": round(time.perf_counter() - started, 2)},
                          [["loss", "eval/loss"], ["accuracy", "eval/accuracy"], ["margin", "eval/margin"]])

    def pair_scores(self, examples: list[PreferenceExample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = collate_preference(examples, self.tokenizer.pad_token_id)
        scores = self.learner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        chosen, rejected = scores.float().chunk(2)
        margins = torch.tensor([e.margin or 0.0 for e in examples]) if self.cfg.rm.use_margin else torch.zeros(len(examples))
        return chosen, rejected, margins

    def pair_losses(self, chosen: torch.Tensor, rejected: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
        return algorithms.bradley_terry_loss(chosen, rejected, margin=margins,
                                             center_coefficient=self.cfg.rm.center_coefficient)

    def _stats(self, losses, chosen, rejected) -> dict[str, torch.Tensor]:
        return {"loss": losses.detach(), "accuracy": (chosen > rejected).float(), "margin": (chosen - rejected).detach(),
                "reward/chosen": chosen.detach(), "reward/rejected": rejected.detach()}

    def train_step(self, step: int) -> dict:
        cfg, dist = self.cfg, self.dist
        self.learner.train()
        scale = self.grad_accum * dist.world_size / cfg.train.global_batch_size
        sums: dict[str, float] = {}
        for ids in self.sampler.micro_batches(step, dist.rank, dist.world_size, cfg.train.micro_batch_size):
            chosen, rejected, margins = self.pair_scores([self.train_set[i] for i in ids])
            losses = self.pair_losses(chosen, rejected, margins)
            self.learner.backward(losses.sum() * scale)
            self.learner.step()
            accumulate_sums(sums, self._stats(losses, chosen, rejected))
        metrics = global_means(sums, cfg.train.global_batch_size)
        metrics["lr"] = self.learner.lr
        if self.learner.grad_norm is not None:
            metrics["grad_norm"] = self.learner.grad_norm
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite loss {metrics['loss']} at step {step + 1}")
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_set:
            return {}
        sums: dict[str, float] = {}
        count = 0
        with eval_mode(self.learner):
            for examples, real in eval_batches(self.eval_set, self.dist, self.cfg.train.eval_batch_size):
                chosen, rejected, margins = self.pair_scores(examples)
                if real:
                    count += len(examples)
                    accumulate_sums(sums, self._stats(self.pair_losses(chosen, rejected, margins), chosen, rejected))
        (total,) = all_reduce_sum([count])
        return global_means(sums, total)

