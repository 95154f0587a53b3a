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
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain import algorithms
from posttrain.config.schema import ConfigError, check_batch_sizes, doc
from posttrain.data.preference import PreferenceExample, collate_preference, load_pairs
from posttrain.data.sampler import GlobalBatchSampler
from posttrain.distributed import DistInfo, all_reduce_sum
from posttrain.errors import DataError
from posttrain.faults import maybe_kill
from posttrain.learner import build_learner
from posttrain.learner.engine import apply_lora
from posttrain.learner.logprobs import completion_logprobs
from posttrain.models.loading import check_model_path, load_causal_lm, load_tokenizer
from posttrain.trainers.common import (
    RecipeConfig,
    accumulate_sums,
    check_finite_loss,
    check_output_dir,
    eval_batches,
    global_means,
    seed_everything,
)
from posttrain.trainers.harness import RunHarness, progress_bar, run_identity, should_checkpoint
from posttrain.trainers.reference import (
    FrozenReference,
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
    check_model_path(cfg.model.path)
    if cfg.dpo.reference_path:
        check_model_path(cfg.dpo.reference_path)
    check_batch_sizes(cfg.train, world_size, source)
    check_output_dir(cfg)
    train, _, _, _ = prepare_data(cfg, load_tokenizer(cfg.model, cfg.data.chat_template))
    if "modpo" in cfg.dpo.loss_type:
        modpo_margin_rewards(train)  # every row carries the other objectives' rewards
    if len(train) < cfg.train.global_batch_size:
        raise DataError(f"{cfg.data.path}: {len(train)} valid pairs are fewer than one global batch "
                        f"(train.global_batch_size={cfg.train.global_batch_size}).")


# ------------------------------------------------------------------------------------- pure pieces


def sequence_logps(forward, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [N] and completion token counts [N] of a collated batch under ``forward``."""
    logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return completion_logprobs(logits, batch["input_ids"], batch["completion_mask"])


def policy_pair_logps(forward, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Policy log-prob sums and lengths of a ``collate_preference`` batch (chosen rows first, then rejected):
    one concatenated forward for both."""
    sums, counts = sequence_logps(forward, batch)
    chosen, rejected = sums.chunk(2)
    chosen_len, rejected_len = counts.chunk(2)
    return {"chosen": chosen, "rejected": rejected, "chosen_len": chosen_len, "rejected_len": rejected_len}


def reference_pair_logps(reference: FrozenReference, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference log-prob sums (``ref_chosen``, ``ref_rejected``) of the same batch, without a graph."""
    sums, _ = reference.sequence_logps(batch)
    ref_chosen, ref_rejected = sums.chunk(2)
    return {"ref_chosen": ref_chosen, "ref_rejected": ref_rejected}


def modpo_margin_rewards(examples: list[PreferenceExample]) -> dict[str, torch.Tensor]:
    """MODPO's margin rewards [B, K-1] of chosen and rejected, from the data's columns."""
    missing = next((i for i, e in enumerate(examples) if e.margin_rewards is None), None)
    if missing is not None:
        raise DataError("dpo.loss_type modpo needs the columns margin_rewards_chosen and margin_rewards_rejected on "
                        "every row (the other objectives' rewards of each completion, e.g. from posttrain score).")
    widths = {len(e.margin_rewards[0]) for e in examples}
    if len(widths) > 1:
        raise DataError(f"dpo.loss_type modpo: rows have different numbers of margin rewards ({sorted(widths)}).")
    return {"margin_rewards_chosen": torch.tensor([e.margin_rewards[0] for e in examples]),
            "margin_rewards_rejected": torch.tensor([e.margin_rewards[1] for e in examples])}


def pair_losses(settings: DPOSettings, logps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-pair loss: the weighted sum of the configured preference losses.

    ``logps`` holds summed log-probs (``chosen``, ``rejected`` and, unless every loss is
    reference-free, ``ref_chosen``, ``ref_rejected``) and completion token counts.
    """
    return algorithms.preference_loss(
        settings.loss_type, logps["chosen"], logps["rejected"], logps.get("ref_chosen"), logps.get("ref_rejected"),
        beta=settings.beta, label_smoothing=settings.label_smoothing, loss_weights=settings.loss_weights,
        chosen_lengths=logps["chosen_len"], rejected_lengths=logps["rejected_len"],
        **{k: logps[k] for k in ("margin_rewards_chosen", "margin_rewards_rejected") if k in logps},
        **settings.loss_args)


def build_policy(cfg: RecipeConfig, dist: DistInfo, grad_accum: int, total_steps: int):
    """The trained causal LM (LoRA-wrapped if configured) under the DeepSpeed learner."""
    model = load_causal_lm(cfg.model)
    if cfg.model.lora.enabled:
        model = apply_lora(model, cfg.model.lora)
    return build_learner(model, cfg.learner, world_size=dist.world_size, micro_batch_size=cfg.train.micro_batch_size,
                         grad_accum=grad_accum, total_steps=total_steps)


def build_reference(cfg: RecipeConfig, learner, reference_path: str | None) -> FrozenReference:
    """The frozen reference: the policy with its LoRA adapter disabled (no second copy), else a copy of
    ``reference_path`` or of the policy's initial weights (partitioned like the policy under ZeRO-3)."""
    if cfg.model.lora.enabled and not reference_path:
        log.info("reference: the policy with its LoRA adapter disabled (no second copy)")
        return FrozenReference(None, policy=learner)
    path = reference_path or cfg.model.path
    log.info("reference: a frozen copy of %s", path)
    model = load_causal_lm(type(cfg.model)(path=path, dtype=cfg.model.dtype,
                                           trust_remote_code=cfg.model.trust_remote_code))
    return FrozenReference(model, zero_stage=cfg.learner.zero_stage)


# ------------------------------------------------------------------------------------- the recipe


class Recipe:
    def __init__(self, cfg: Config, dist: DistInfo, source: str = "the recipe") -> None:
        self.cfg = cfg
        self.dist = dist
        self.source = source
        self.needs_reference = any(name not in REFERENCE_FREE for name in cfg.dpo.loss_type)

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
        log.info("data: %d train / %d eval pairs; %s; invalid rows skipped: %s; %d steps",
                 len(self.train_set), len(self.eval_set), report.summary(), skipped or "none", self.total_steps)
        self.learner = build_policy(cfg, self.dist, self.grad_accum, self.total_steps)
        self.reference = build_reference(cfg, self.learner, cfg.dpo.reference_path) if self.needs_reference else None
        self.run = RunHarness(cfg, self.dist, run_identity(cfg, losses=cfg.dpo.loss_type))
        self.run.history["skipped_rows"] = skipped
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
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracy']:.2f}")
            if should_checkpoint(cfg, done, self.total_steps):
                run.save(done, self.learner, self.tokenizer, state={"total_steps": self.total_steps})
            maybe_kill(done)
        progress.close()
        start, end = run.history.get("eval_start", {}), run.history.get("eval_end", {})
        if self.dist.is_main and end:
            log.info("eval reward accuracy %.3f -> %.3f, loss %.4f -> %.4f", start.get("rewards/accuracy", math.nan),
                     end.get("rewards/accuracy", math.nan), start.get("loss", math.nan), end.get("loss", math.nan))
        return run.finish({"steps": self.total_steps, "eval_start": start, "eval_end": end,
                           "skipped_rows": run.history.get("skipped_rows"),
                           "train_seconds": round(time.perf_counter() - started, 2)},
                          [["loss", "eval/loss"], ["rewards/accuracy", "eval/rewards/accuracy"],
                           ["rewards/margin", "eval/rewards/margin"], ["logps/chosen", "logps/rejected"]])

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

    def train_step(self, step: int) -> dict:
        cfg, dist = self.cfg, self.dist
        self.learner.train()
        # DeepSpeed averages over accumulation steps and ranks; undo both so the step's gradient is
        # that of the mean per-pair loss over the global batch.
        scale = self.grad_accum * dist.world_size / cfg.train.global_batch_size
        sums: dict[str, float] = {}
        for ids in self.sampler.micro_batches(step, dist.rank, dist.world_size, cfg.train.micro_batch_size):
            logps = self.pair_logps([self.train_set[i] for i in ids], ids, "train")
            losses = pair_losses(cfg.dpo, logps)
            self.learner.backward(losses.sum() * scale)
            self.learner.step()
            accumulate_sums(sums, {"loss": losses.detach(), **self._reward_stats(logps)})
        metrics = global_means(sums, cfg.train.global_batch_size)
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
        count = 0
        with eval_mode(self.learner):
            shard_index = list(range(len(self.eval_set)))[self.dist.rank :: self.dist.world_size]
            offset = 0
            for examples, real in eval_batches(self.eval_set, self.dist, self.cfg.train.eval_batch_size):
                # A rank with nothing left repeats a batch (discarded) so ZeRO-3's gathers stay in step.
                indices = shard_index[offset : offset + len(examples)] if real else [0] * len(examples)
                logps = self.pair_logps(examples, indices, "eval")
                if real:
                    offset += len(examples)
                    count += len(examples)
                    accumulate_sums(sums, {"loss": pair_losses(self.cfg.dpo, logps), **self._reward_stats(logps)})
        (total,) = all_reduce_sum([count])
        return global_means(sums, total)
