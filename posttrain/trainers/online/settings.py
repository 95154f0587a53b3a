"""The settings every online recipe has, their batch arithmetic and the cheap checks run before anything starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from posttrain.config.schema import ConfigError, TrainConfig, doc
from posttrain.errors import DataError
from posttrain.models.loading import check_model_path, load_tokenizer
from posttrain.trainers.common import check_output_dir
from posttrain.trainers.online.prompts import load_prompts


@dataclass
class RolloutCorrection:
    """Importance correction between the sampler's and the learner's log-probs of the sampled tokens
    (``posttrain.algorithms.truncated_importance_weights``): every loss token is weighted by w, the
    learner/sampler ratio per token (``token``), of the whole sequence (``sequence``: exp of the summed
    log-ratio) or its geometric mean (``geometric``), truncated to [clip_min, clip_max] (``truncate``, TIS) or
    zeroed outside it (``mask``, MIS). ("Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training", Yao et al., 2025.)"""

    level: Literal["off", "token", "sequence", "geometric"] = doc("off", "off, or the level of the importance ratio: token, sequence or geometric.")
    mode: Literal["truncate", "mask"] = doc("truncate", "truncate: clamp w to [clip_min, clip_max] (TIS); mask: weight 0 outside it (MIS).")
    clip_min: float | None = doc(None, "Lower bound of w (None: none).")
    clip_max: float = doc(2.0, "Upper bound of w.")

    @property
    def enabled(self) -> bool:
        return self.level != "off"

    def weights(self, learner_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor):
        """``(weights broadcastable to [B, T], metrics)``; metrics keyed ``tis_<name>``."""
        from posttrain.algorithms import truncated_importance_weights

        result = truncated_importance_weights(learner_logprobs, sampler_logprobs, mask, level=self.level,
                                              clip_max=self.clip_max, clip_min=self.clip_min, mode=self.mode)
        return result.weights.expand_as(mask), {f"tis_{k}": float(v) for k, v in result.metrics.items()}

    def check(self, key: str, source: str) -> None:
        """A ``ConfigError`` naming ``key`` for bounds that cannot work."""
        if self.enabled and (self.clip_max <= 0 or (self.clip_min is not None and self.clip_min > self.clip_max)):
            raise ConfigError(f"{key} in {source}: need 0 < clip_max and clip_min <= clip_max, got "
                              f"clip_min={self.clip_min}, clip_max={self.clip_max}.")


@dataclass
class RewardEnsemble:
    """Several rewards (``orm`` models, usually) reduced to one per sample before they are combined
    (``posttrain.algorithms.ensemble_reward``; "Reward Model Ensembles Help Mitigate Overoptimization", Coste
    et al., 2023)."""

    members: list[str] = doc([], "Labels of the rewards to ensemble (at least two; a reward's label defaults to its name). Empty: no ensemble.")
    method: str = doc("mean", "mean, wco (worst case: the members' minimum) or uwo (mean - uwo_coef x variance over members).")
    uwo_coef: float = doc(0.5, "lambda of uwo.")
    label: str = doc("ensemble", "The ensemble's column in metrics (reward/<label>); it replaces its members in the combination.")
    weight: float = doc(1.0, "Its weight in the combination.")

    def spec(self):
        from reward_models import Ensemble

        if not self.members:
            return None
        return Ensemble(list(self.members), self.method, self.uwo_coef, self.label, self.weight)


@dataclass
class OnlineSettings:
    """Settings every online RL recipe has; a recipe's section (``grpo:``, ``ppo:``) extends it."""

    section: ClassVar[str] = "online"

    prompts_per_step: int = doc(8, "Prompts per rollout step (over all ranks); each gets rollout.n samples.")
    rewards: list[dict] = doc([{"name": "math_verify"}], "Rewards: [{name, weight, args}], by registry name, 'pkg.mod:fn' or './file.py:fn'.")
    reward_rule: Literal["sum", "mean", "normalize"] = doc("sum", "How weighted rewards combine (docs/rewards.md).")
    reward_ensemble: RewardEnsemble = doc(RewardEnsemble, "Reduce several rewards (e.g. orm models) to one: {members: [labels], method: mean | wco | uwo} (docs/rewards.md).")
    reward_objectives: str | None = doc(None, "Combine the rewards as objectives instead of reward_rule: weighted_sum, maxmin (MaxMin-RLHF: the objective with the lowest mean over the step's batch), min or softmin, each objective its reward times its weight (docs/rewards.md).")
    reward_softmin_temperature: float = doc(1.0, "Temperature T of reward_objectives: softmin, -T log sum_k exp(-r_k / T).")
    reward_on_error: Literal["fail", "zero"] = doc("fail", "A reward that raises, hangs or returns NaN: stop with an error naming it and the row, or score 0 and count it.")
    reward_timeout: float = doc(120.0, "Seconds one reward call may take.")
    max_prompt_length: int = doc(256, "Longest prompt in tokens; longer ones follow data.overlong (drop or error).")
    nonfinite_loss: Literal["stop", "skip"] = doc("stop", "A non-finite loss: stop with an error (the last checkpoint stays intact), or skip: drop that micro-batch's gradient and count it (nonfinite_skipped).")
    eval_prompts: int = doc(200, "Held-out prompts scored at each evaluation (greedy).")
    sync_bucket_mb: int = doc(256, "Weight-sync bucket size in MiB (bounds the extra memory of a sync).")
    padding_free: bool = doc(True, "Pack each micro-batch's sequences into fewer rows for the learner's forward passes (policy, reference, critic) instead of padding them to the longest; same outputs, less compute when lengths vary (docs/rl.md).")

    pf_ppo: Literal["off", "best_of_n", "best_random", "best_worst"] = doc("off", "PF-PPO policy filtration: train only on the samples of each prompt whose rewards are most reliable: best_worst (its highest and lowest reward), best_random (the highest and one other at random) or best_of_n (the highest); the others stay out of the loss (filtered_share). Needs rollout.n >= 2 (docs/rl.md).")
    rollout_correction: RolloutCorrection = doc(RolloutCorrection, "Importance correction between the sampler's and the learner's log-probs (docs/rl.md).")

    def validate(self, source: str) -> None:
        self.rollout_correction.check(f"{self.section}.rollout_correction", source)
        if not self.rewards:
            raise ConfigError(f"{self.section}.rewards in {source} is empty; name at least one reward.")
        if self.prompts_per_step < 1:
            raise ConfigError(f"{self.section}.prompts_per_step in {source} must be at least 1, got {self.prompts_per_step}.")


def rollout_section(n: int, help_text: str):
    """The ``rollout:`` field of an online recipe's config: vLLM settings defaulting to ``n`` samples per prompt,
    temperature 1, 64 new tokens, eager mode."""
    from posttrain.rollout import RolloutConfig

    return field(default_factory=lambda: RolloutConfig(n=n, temperature=1.0, max_tokens=64, enforce_eager=True),
                 metadata={"help": help_text})


def batch_plan(settings: OnlineSettings, *, n: int, epochs: int, train: TrainConfig, world_size: int,
               source: str) -> dict[str, int]:
    """The batch arithmetic, checked up front with a message that says which numbers must divide which.

    A rollout step holds ``prompts_per_step x n`` sequences; each optimisation epoch splits them into
    mini-batches of ``train.global_batch_size`` sequences (one optimizer step each), run as micro-batches
    of ``train.micro_batch_size`` per rank.
    """
    section = settings.section
    sequences = settings.prompts_per_step * n
    if train.max_steps is None:
        raise ConfigError(f"train.max_steps is not set in {source}: online recipes run a number of rollout steps.")
    if settings.prompts_per_step % world_size:
        raise ConfigError(f"{section}.prompts_per_step ({settings.prompts_per_step}) in {source} must be a multiple of "
                          f"the number of processes ({world_size}): each rank samples whole groups.")
    if sequences % train.global_batch_size:
        raise ConfigError(f"{section}.prompts_per_step x rollout.n = {sequences} sequences per rollout in {source} must "
                          f"be a multiple of train.global_batch_size ({train.global_batch_size}), the sequences per "
                          "optimizer step.")
    per_rank = train.micro_batch_size * world_size
    if train.global_batch_size % per_rank:
        raise ConfigError(f"train.global_batch_size ({train.global_batch_size}) in {source} must be a multiple of "
                          f"train.micro_batch_size ({train.micro_batch_size}) x processes ({world_size}) = {per_rank}.")
    mini_batches = sequences // train.global_batch_size
    return {"sequences": sequences, "mini_batches": mini_batches, "grad_accum": train.global_batch_size // per_rank,
            "optimizer_steps": train.max_steps * epochs * mini_batches}


def build_rewards(settings: OnlineSettings):
    """The recipe's ``RewardSet`` (resolves every reward name, path and argument)."""
    from reward_models import RewardSet, RewardSpec

    specs = [RewardSpec.from_dict(item, f"{settings.section}.rewards[{i}]") for i, item in enumerate(settings.rewards)]
    return RewardSet(specs, rule=settings.reward_rule, on_error=settings.reward_on_error,
                     timeout=settings.reward_timeout, ensemble=settings.reward_ensemble.spec(),
                     objectives=settings.reward_objectives, temperature=settings.reward_softmin_temperature)


def preflight(cfg, settings: OnlineSettings, plan: dict[str, int]) -> str:
    """Cheap checks of an online recipe's model, output directory, prompts and rewards; a one-line report."""
    check_model_path(cfg.model.path)
    check_output_dir(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    train, evaluation, report, skipped = load_prompts(cfg.data, cfg.seed, tokenizer, settings.max_prompt_length)
    if len(train) < settings.prompts_per_step:
        raise DataError(f"{cfg.data.path}: {len(train)} prompts are fewer than {settings.section}.prompts_per_step "
                        f"({settings.prompts_per_step}).")
    build_rewards(settings).close()
    return (f"{len(train)} train / {len(evaluation)} eval prompts ({report.summary()}; invalid rows skipped: "
            f"{skipped or 'none'}); {plan['optimizer_steps']} optimizer steps")
