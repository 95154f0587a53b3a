"""Direct preference optimisation and its relatives (IPO, SimPO, ORPO, RPO, robust/conservative DPO, ...).

Supports:
  - every preference loss of ``posttrain.algorithms`` by name (``dpo.loss_type``), or a weighted
    combination (``dpo.loss_type: [sigmoid, sft]`` with ``dpo.loss_weights``)
  - a reference from the policy's initial weights or its own path; with LoRA the reference is the base
    model with the adapter disabled (no second copy); precomputed reference log-probs (one pass, cached
    in ``<output_dir>/cache`` under a fingerprint of the reference model and the tokenised data)
  - reference-free losses (SimPO, ORPO, CPO) load no reference at all
  - chosen and rejected in one concatenated forward
  - metrics on train and eval: loss, reward accuracy, margins, chosen/rejected rewards and log-probs
  - DeepSpeed ZeRO 0-3, 1..N processes, checkpoints and ``resume=auto``

Assumes:
  - paired data: ``prompt``, ``chosen``, ``rejected`` (strings or message lists)

The step's loss is the mean per-pair loss over the global batch, whatever its split into ranks and
micro-batches. With ``loss_type: sigmoid`` and the same batch, the first step's loss and gradients
equal TRL's ``DPOTrainer`` (tested).

Direct Preference Optimization: Your Language Model is Secretly a Reward Model (Rafailov et al., 2023).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain import algorithms
from posttrain.config.schema import ConfigError, doc
from posttrain.data.preference import PreferenceExample, collate_preference, load_pairs
from posttrain.distributed import DistInfo
from posttrain.trainers import offline
from posttrain.trainers.common import RecipeConfig, global_means
from posttrain.trainers.dpo_losses import (
    modpo_margin_rewards,
    pair_losses,
    policy_pair_logps,
    reference_pair_logps,
)
from posttrain.trainers.harness import RunHarness, run_identity
from posttrain.trainers.loop import train_loop
from posttrain.trainers.policy import build_policy, build_reference
from posttrain.trainers.reference import (
    cache_key,
    eval_mode,
    load_or_compute,
    weights_identity,
)

log = logging.getLogger("posttrain")

# Losses that use only the policy (no reference model is loaded for them).
REFERENCE_FREE = {"simpo", "orpo", "cpo", "sft"}


@dataclass
class DPOSettings:
    loss_type: list[str] = doc(["sigmoid"], "Preference loss names (see docs/algorithms.md); several are summed with loss_weights.")
    loss_weights: list[float] | None = doc(None, "One weight per loss_type (default: all 1).")
    beta: float = doc(0.1, "Inverse temperature of the implicit reward (beta in DPO; tau in IPO).")
    label_smoothing: float = doc(0.0, "Assumed share of flipped labels (conservative / robust DPO).")
    loss_args: dict = doc({}, "Options of the selected losses, e.g. {simpo_gamma: 0.5} or {rpo_alpha: 1.0}; an option no selected loss takes is an error.")
    reference_path: str | None = doc(None, "Reference model directory (default: the policy's initial weights).")
    precompute_reference: bool = doc(False, "Compute reference log-probs once before training and cache them.")

    def validate(self, source: str) -> None:
        known = set(algorithms.PREFERENCE_LOSSES)
        for name in self.loss_type:
            if name not in known:
                import difflib

                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f"Did you mean {close[0]!r}?" if close else f"Valid: {', '.join(sorted(known))}."
                raise ConfigError(f"unknown dpo.loss_type {name!r} in {source}.", hint=hint)
        if "exo_pair" in self.loss_type and not 0 < self.label_smoothing < 1:
            raise ConfigError(f"dpo.loss_type exo_pair in {source} needs 0 < dpo.label_smoothing < 1 (EXO's epsilon, "
                              f"e.g. 1e-3), got {self.label_smoothing}.")
        if "kto" in self.loss_type and "kl" not in self.loss_args:
            raise ConfigError(f"dpo.loss_type kto in {source} needs KTO's reference point z0: set dpo.loss_args.kl "
                              "(a fixed value, e.g. 0.0), or use trainer: kto (recipes/kto.yaml), which estimates it "
                              "from mismatched pairs every step.")
        if "modpo" in self.loss_type and "modpo_weights" not in self.loss_args:
            raise ConfigError(f"dpo.loss_type modpo in {source} needs dpo.loss_args.modpo_weights: [w_0, w_1, ...], the "
                              "weight of this preference (w_0 > 0) and of each margin reward in the data.")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(f"dpo.loss_weights in {source} needs one weight per loss_type ({len(self.loss_type)}).")


@dataclass
class Config(RecipeConfig):
    dpo: DPOSettings = field(default_factory=DPOSettings, metadata={"help": "Preference-loss settings."})


def prepare_data(cfg: Config, tokenizer):
    return load_pairs(cfg.data, cfg.seed, tokenizer)


def preflight(cfg: Config, world_size: int, source: str) -> None:
    train = offline.preflight(cfg, world_size, source, lambda tok: prepare_data(cfg, tok), "pairs",
                              [cfg.dpo.reference_path])
    if "modpo" in cfg.dpo.loss_type:
        modpo_margin_rewards(train)  # every row carries the other objectives' rewards


# ------------------------------------------------------------------------------------- pure pieces


# ------------------------------------------------------------------------------------- the recipe


class Recipe:
    def __init__(self, cfg: Config, dist: DistInfo, source: str = "the recipe") -> None:
        self.cfg, self.dist, self.source = cfg, dist, source
        self.needs_reference = any(name not in REFERENCE_FREE for name in cfg.dpo.loss_type)

    def setup(self) -> None:
        cfg = self.cfg
        self.data = offline.setup_data(cfg, self.dist, self.source, lambda tok: prepare_data(cfg, tok), "pairs")
        self.tokenizer, self.train_set, self.eval_set = self.data.tokenizer, self.data.train_set, self.data.eval_set
        self.total_steps = self.data.total_steps
        self.learner = build_policy(cfg, self.dist, self.data.grad_accum, self.total_steps)
        self.reference = (build_reference(cfg, self.learner, cfg.dpo.reference_path)
                          if self.needs_reference else None)
        self.run = RunHarness(cfg, self.dist, run_identity(cfg, losses=cfg.dpo.loss_type))
        self.run.history["skipped_rows"] = self.data.skipped
        self.run.restore(self.learner)
        self.run.open_metrics()
        self.cached_reference: dict[str, torch.Tensor] | None = None
        if self.needs_reference and cfg.dpo.precompute_reference:
            self.cached_reference = self._precompute_reference()

    def _precompute_reference(self) -> dict[str, torch.Tensor]:
        """Reference log-prob sums for every train and eval pair, in dataset order."""
        cfg = self.cfg
        reference_path = cfg.dpo.reference_path or cfg.model.path
        key = cache_key(weights_identity(reference_path), cfg.model.lora.enabled and not cfg.dpo.reference_path,
                        [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in self.train_set],
                        [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in self.eval_set])

        def compute():
            with eval_mode(self.learner):
                return {"train": self._reference_pass(self.train_set), "eval": self._reference_pass(self.eval_set)}

        values = load_or_compute(Path(self.run.out) / "cache", key, compute, is_main=self.dist.is_main)
        self.reference = None  # no longer needed: free the copy
        return values

    def _reference_pass(self, examples: list[PreferenceExample]) -> torch.Tensor:
        """[N, 2] reference sums (chosen, rejected); every rank computes all (small) then agrees."""
        out = torch.zeros(len(examples), 2)
        size = self.cfg.train.eval_batch_size
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            ref = reference_pair_logps(self.reference, collate_preference(chunk, self.tokenizer.pad_token_id))
            out[start : start + len(chunk)] = torch.stack([ref["ref_chosen"], ref["ref_rejected"]], dim=1)
        return out

    def train(self) -> dict:
        return train_loop(self.cfg, self.dist, self.run, self.total_steps, self.train_step, self.evaluate, self.save,
                          [["loss", "eval/loss"], ["rewards/accuracy", "eval/rewards/accuracy"],
                           ["rewards/margin", "eval/rewards/margin"], ["logps/chosen", "logps/rejected"]],
                          progress_keys=("loss", "rewards/accuracy"),
                          summary=lambda start, end: {"skipped_rows": self.run.history.get("skipped_rows")})

    def save(self, done: int) -> None:
        self.run.save(done, self.learner, self.tokenizer, state={"total_steps": self.total_steps})

    def pair_logps(self, examples: list[PreferenceExample], indices: list[int], split: str) -> dict[str, torch.Tensor]:
        """Policy (and reference) log-prob sums and lengths for a micro-batch of pairs."""
        batch = collate_preference(examples, self.tokenizer.pad_token_id)
        out = policy_pair_logps(self.learner, batch)
        if "modpo" in self.cfg.dpo.loss_type:
            out.update(modpo_margin_rewards(examples))
        if self.cached_reference is not None:
            ref = self.cached_reference[split][indices]
            out["ref_chosen"], out["ref_rejected"] = ref[:, 0], ref[:, 1]
        elif self.reference is not None:
            out.update(reference_pair_logps(self.reference, batch))
        return out

    def _reward_stats(self, logps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lengths = {} if self.needs_reference else {"chosen_lengths": logps["chosen_len"],
                                                   "rejected_lengths": logps["rejected_len"]}
        rewards = algorithms.preference_rewards(logps["chosen"], logps["rejected"], logps.get("ref_chosen"),
                                                logps.get("ref_rejected"), beta=self.cfg.dpo.beta, **lengths)
        return {"rewards/chosen": rewards.chosen, "rewards/rejected": rewards.rejected,
                "rewards/accuracy": rewards.accuracies, "rewards/margin": rewards.margins,
                "logps/chosen": logps["chosen"].detach(), "logps/rejected": logps["rejected"].detach()}

    def batch_stats(self, examples: list[PreferenceExample], indices: list[int], split: str) -> tuple[torch.Tensor, dict]:
        """Per-pair losses [B] and the per-pair statistics of a micro-batch."""
        logps = self.pair_logps(examples, indices, split)
        losses = pair_losses(self.cfg.dpo, logps)
        return losses, {"loss": losses.detach(), **self._reward_stats(logps)}

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        micro_batches = offline.micro_batch_ids(self.data, step, self.dist, cfg.train.micro_batch_size)
        sums = offline.optimizer_step(self.learner, self.data, micro_batches,
                                      lambda examples, ids: self.batch_stats(examples, ids, "train"),
                                      cfg.train.global_batch_size, self.dist.world_size)
        metrics = global_means(sums, cfg.train.global_batch_size)
        return offline.step_metrics(metrics, self.learner, step, self.run.last_checkpoint)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_set:
            return {}
        sums, count = offline.evaluation_sums(self.learner, self.data, self.dist, self.cfg.train.eval_batch_size,
                                              lambda examples, ids, _real: self.batch_stats(examples, ids, "eval")[1])
        return global_means(sums, count)
