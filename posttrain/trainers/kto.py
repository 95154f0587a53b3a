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
from dataclasses import dataclass, field
from typing import Literal

import torch

from posttrain import algorithms
from posttrain.config.schema import ConfigError, doc
from posttrain.data.preference import UnpairedExample, collate_unpaired, load_unpaired
from posttrain.distributed import DistInfo, all_reduce_sum
from posttrain.trainers import offline
from posttrain.trainers.common import RecipeConfig
from posttrain.trainers.dpo_losses import sequence_logps
from posttrain.trainers.harness import RunHarness, run_identity
from posttrain.trainers.loop import train_loop
from posttrain.trainers.policy import build_policy, build_reference

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
    offline.preflight(cfg, world_size, source, lambda tok: prepare_data(cfg, tok), "rows", [cfg.kto.reference_path])


def kl_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """z0 over this micro-batch on every rank: the all-reduced mean of the mismatched log-ratios, clamped at 0
    (``algorithms.kto_kl_reference`` across ranks). ``weight`` 0 leaves a rank's values out (padding batches)."""
    total, count = all_reduce_sum([weight * float((kl_logps - ref_kl_logps).sum()), weight * len(kl_logps)])
    return torch.tensor(max(total / max(count, 1.0), 0.0))


class Recipe:
    def __init__(self, cfg: Config, dist: DistInfo, source: str = "the recipe") -> None:
        self.cfg, self.dist, self.source = cfg, dist, source

    def setup(self) -> None:
        cfg = self.cfg
        self.data = offline.setup_data(cfg, self.dist, self.source, lambda tok: prepare_data(cfg, tok), "rows")
        self.tokenizer, self.train_set, self.eval_set = self.data.tokenizer, self.data.train_set, self.data.eval_set
        self.total_steps = self.data.total_steps
        desirable = sum(e.label for e in self.train_set)
        log.info("train rows: %d desirable, %d undesirable", desirable, len(self.train_set) - desirable)
        self.learner = build_policy(cfg, self.dist, self.data.grad_accum, self.total_steps)
        self.reference = build_reference(cfg, self.learner, cfg.kto.reference_path)
        self.run = RunHarness(cfg, self.dist, run_identity(cfg, kto=cfg.kto.loss_type))
        self.run.history["skipped_rows"] = self.data.skipped
        self.run.restore(self.learner)
        self.run.open_metrics()

    def train(self) -> dict:
        return train_loop(self.cfg, self.dist, self.run, self.total_steps, self.train_step, self.evaluate, self.save,
                          [["loss", "eval/loss"], ["rewards/margin", "eval/rewards/margin"],
                           ["rewards/desirable", "rewards/undesirable"], ["kl"]],
                          progress_keys=("loss", "rewards/margin"),
                          summary=lambda start, end: {"skipped_rows": self.run.history.get("skipped_rows")})

    def save(self, done: int) -> None:
        self.run.save(done, self.learner, self.tokenizer, state={"total_steps": self.total_steps})

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
        cfg = self.cfg
        micro_batches = offline.micro_batch_ids(self.data, step, self.dist, cfg.train.micro_batch_size)
        sums = offline.optimizer_step(self.learner, self.data, micro_batches, lambda examples, _ids: self.losses(examples),
                                      cfg.train.global_batch_size, self.dist.world_size)
        return offline.step_metrics(self._means(sums), self.learner, step, self.run.last_checkpoint)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_set:
            return {}

        def stats(examples, _indices, real):
            n = len(examples)
            # A lone example has no other completion to pair with: borrow one, count only its own.
            _, sums = self.losses(examples if n > 1 else examples + self.eval_set[1:2], real)
            return {k: v[:n] for k, v in sums.items()}

        sums, _ = offline.evaluation_sums(self.learner, self.data, self.dist, self.cfg.train.eval_batch_size, stats)
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
