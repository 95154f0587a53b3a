"""Kahneman-Tversky optimisation (KTO) on unpaired preference data.

Supports:
  - ``kto.loss_type: kto`` (with the KL reference point) or ``apo_zero_unpaired``
  - separate weights for desirable and undesirable examples (``kto.desirable_weight``,
    ``kto.undesirable_weight``) to balance a skewed dataset
  - the reference as in DPO: the policy's initial weights, its own path, or with LoRA the base model
    with the adapter disabled (no second copy)
  - metrics on train and eval: loss, the reference point z0, rewards of desirable and undesirable
    examples and their margin
  - DeepSpeed ZeRO 0-3, 1..N processes, checkpoints and ``resume=auto``

Assumes:
  - unpaired data: ``prompt``, ``completion`` (strings or message lists), ``label`` (true = desirable)
  - micro-batches of at least 2 examples (the reference point pairs each prompt with another example's
    completion)

Per example, with r = log pi(y|x) - log pi_ref(y|x) (summed over completion tokens):

    desirable:    l = w_d (1 - sigma(beta (r - z0)))
    undesirable:  l = w_u (1 - sigma(beta (z0 - r)))

z0 = max(0, mean over mismatched pairs of log pi(y'|x) - log pi_ref(y'|x)), without gradient; the
mismatched pairs are prompt i with completion i - 1 of the same micro-batch (as TRL builds them), and
the mean runs over the micro-batch on every rank. The step's loss is the mean over the global batch.

KTO: Model Alignment as Prospect Theoretic Optimization (Ethayarajh et al., 2024).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from posttrain import algorithms
from posttrain.config.schema import ConfigError, check_batch_sizes, doc
from posttrain.data.preference import UnpairedExample, collate_unpaired, load_unpaired
from posttrain.data.sampler import GlobalBatchSampler
from posttrain.distributed import DistInfo, all_reduce_sum
from posttrain.errors import DataError
from posttrain.faults import maybe_kill
from posttrain.models.loading import check_model_path, load_tokenizer
from posttrain.trainers.common import (
    RecipeConfig,
    accumulate_sums,
    check_finite_loss,
    check_output_dir,
    eval_batches,
    seed_everything,
)
from posttrain.trainers.dpo import build_policy, build_reference, sequence_logps
from posttrain.trainers.harness import RunHarness, progress_bar, run_identity, should_checkpoint
from posttrain.trainers.reference import eval_mode

log = logging.getLogger("posttrain")


@dataclass
class KTOSettings:
    loss_type: Literal["kto", "apo_zero_unpaired"] = doc("kto", "kto (with the KL reference point z0) or apo_zero_unpaired (no z0).")
    beta: float = doc(0.1, "Inverse temperature of the implicit reward beta * (log pi - log pi_ref).")
    desirable_weight: float = doc(1.0, "Weight of desirable examples' losses (lambda_D).")
    undesirable_weight: float = doc(1.0, "Weight of undesirable examples' losses (lambda_U).")
    reference_path: str | None = doc(None, "Reference model directory (default: the policy's initial weights).")


@dataclass
class Config(RecipeConfig):
    kto: KTOSettings = field(default_factory=KTOSettings, metadata={"help": "KTO settings (trainer: kto)."})

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.train.micro_batch_size < 2 or self.train.eval_batch_size < 2:
            raise ConfigError(f"KTO in {source} needs train.micro_batch_size and train.eval_batch_size of at "
                              "least 2: its reference point pairs each prompt with another example's completion.")


def prepare_data(cfg: Config, tokenizer):
    return load_unpaired(cfg.data, cfg.seed, tokenizer)


def preflight(cfg: Config, world_size: int, source: str) -> None:
    check_model_path(cfg.model.path)
    if cfg.kto.reference_path:
        check_model_path(cfg.kto.reference_path)
    check_batch_sizes(cfg.train, world_size, source)
    check_output_dir(cfg)
    train, _, _, _ = prepare_data(cfg, load_tokenizer(cfg.model, cfg.data.chat_template))
    if len(train) < cfg.train.global_batch_size:
        raise DataError(f"{cfg.data.path}: {len(train)} valid rows are fewer than one global batch "
                        f"(train.global_batch_size={cfg.train.global_batch_size}).")


def kl_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """z0 over this micro-batch on every rank: the all-reduced mean of the mismatched log-ratios, clamped at 0
    (``algorithms.kto_kl_reference`` across ranks). ``weight`` 0 leaves a rank's values out (padding batches)."""
    total, count = all_reduce_sum([weight * float((kl_logps - ref_kl_logps).sum()), weight * len(kl_logps)])
    return torch.tensor(max(total / max(count, 1.0), 0.0))


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
        self.train_set, self.eval_set, report, skipped = prepare_data(cfg, self.tokenizer)
        self.sampler = GlobalBatchSampler(len(self.train_set), cfg.train.global_batch_size, seed=cfg.seed,
                                          shuffle=cfg.data.shuffle)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.sampler.steps_per_epoch
        desirable = sum(e.label for e in self.train_set)
        log.info("data: %d train (%d desirable, %d undesirable) / %d eval rows; %s; invalid rows skipped: %s; %d steps",
                 len(self.train_set), desirable, len(self.train_set) - desirable, len(self.eval_set),
                 report.summary(), skipped or "none", self.total_steps)
        self.learner = build_policy(cfg, self.dist, self.grad_accum, self.total_steps)
        self.reference = build_reference(cfg, self.learner, cfg.kto.reference_path)
        self.run = RunHarness(cfg, self.dist, run_identity(cfg, kto=cfg.kto.loss_type))
        self.run.history["skipped_rows"] = skipped
        self.run.restore(self.learner)
        self.run.open_metrics()

    # ---------------------------------------------------------------- train
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
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margin']:.3f}")
            if should_checkpoint(cfg, done, self.total_steps):
                run.save(done, self.learner, self.tokenizer, state={"total_steps": self.total_steps})
            maybe_kill(done)
        progress.close()
        start, end = run.history.get("eval_start", {}), run.history.get("eval_end", {})
        if self.dist.is_main and end:
            log.info("eval reward margin (desirable - undesirable) %.3f -> %.3f, loss %.4f -> %.4f",
                     start.get("rewards/margin", math.nan), end.get("rewards/margin", math.nan),
                     start.get("loss", math.nan), end.get("loss", math.nan))
        return run.finish({"steps": self.total_steps, "eval_start": start, "eval_end": end,
                           "skipped_rows": run.history.get("skipped_rows"),
                           "train_seconds": round(time.perf_counter() - started, 2)},
                          [["loss", "eval/loss"], ["rewards/margin", "eval/rewards/margin"],
                           ["rewards/desirable", "rewards/undesirable"], ["kl"]])

    def losses(self, examples: list[UnpairedExample], real: bool = True) -> tuple[torch.Tensor, dict]:
        """Per-example KTO losses [B] and the sums their metrics are made of."""
        cfg = self.cfg.kto
        batch = collate_unpaired(examples, self.tokenizer.pad_token_id, self.cfg.data.max_length)
        n = len(examples)
        matched = {k: v[:n] for k, v in batch.items() if k != "labels"}
        mismatched = {k: v[n:] for k, v in batch.items() if k != "labels"}
        logps, _ = sequence_logps(self.learner, matched)
        ref_logps, _ = self.reference.sequence_logps(batch)  # matched and mismatched in one pass
        ref_logps, ref_kl_logps = ref_logps[:n], ref_logps[n:]
        kl = torch.zeros(())
        if cfg.loss_type == "kto":
            with torch.no_grad():
                kl_logps, _ = sequence_logps(self.learner, mismatched)
            kl = kl_reference_point(kl_logps, ref_kl_logps, weight=1.0 if real else 0.0)
        labels = batch["labels"]
        losses = algorithms.kto_loss(logps, ref_logps, labels, beta=cfg.beta, kl=kl, loss_type=cfg.loss_type,
                                     desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
        rewards = cfg.beta * (logps - ref_logps).detach()
        good = labels.to(rewards.dtype)
        sums = {"loss": losses.detach(), "kl": kl.expand(n), "desirable": good, "undesirable": 1 - good,
                "reward_desirable": rewards * good, "reward_undesirable": rewards * (1 - good)}
        return losses, sums

    def train_step(self, step: int) -> dict:
        cfg, dist = self.cfg, self.dist
        self.learner.train()
        # DeepSpeed averages over accumulation steps and ranks; undo both so the step's gradient is
        # that of the mean per-example loss over the global batch.
        scale = self.grad_accum * dist.world_size / cfg.train.global_batch_size
        sums: dict[str, float] = {}
        for ids in self.sampler.micro_batches(step, dist.rank, dist.world_size, cfg.train.micro_batch_size):
            losses, stats = self.losses([self.train_set[i] for i in ids])
            self.learner.backward(losses.sum() * scale)
            self.learner.step()
            accumulate_sums(sums, stats)
        metrics = self._means(sums)
        metrics["lr"] = self.learner.lr
        if self.learner.grad_norm is not None:
            metrics["grad_norm"] = self.learner.grad_norm
        check_finite_loss(metrics["loss"], step + 1, self.run.last_checkpoint)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_set:
            return {}
        sums: dict[str, float] = {}
        with eval_mode(self.learner):
            for examples, real in eval_batches(self.eval_set, self.dist, self.cfg.train.eval_batch_size):
                n = len(examples)
                # A lone example has no other completion to pair with: borrow one, count only its own.
                _, stats = self.losses(examples if n > 1 else examples + self.eval_set[1:2], real)
                if real:
                    accumulate_sums(sums, {k: v[:n] for k, v in stats.items()})
        return self._means(sums)

    @staticmethod
    def _means(sums: dict[str, float]) -> dict[str, float]:
        """Global means: loss and z0 per example, rewards per desirable / undesirable example."""
        keys = ["loss", "kl", "desirable", "undesirable", "reward_desirable", "reward_undesirable"]
        loss, kl, n_good, n_bad, r_good, r_bad = all_reduce_sum([sums.get(k, 0.0) for k in keys])
        count = max(n_good + n_bad, 1.0)
        desirable, undesirable = r_good / max(n_good, 1.0), r_bad / max(n_bad, 1.0)
        return {"loss": loss / count, "kl": kl / count, "rewards/desirable": desirable,
                "rewards/undesirable": undesirable, "rewards/margin": desirable - undesirable,
                "desirable_share": n_good / count}
