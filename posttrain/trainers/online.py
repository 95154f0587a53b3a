"""Components shared by the online RL recipes (GRPO, PPO).

  - ``OnlineSettings``: the settings every online recipe has (prompts per step, rewards and their
    failure policy, prompt length, non-finite loss policy, evaluation, sync buckets);
  - ``batch_plan`` / ``preflight``: the batch arithmetic and the cheap checks, before anything starts;
  - ``OnlineRollouts``: prompts, the colocated vLLM engine, rewards, weight sync and evaluation;
  - ``rollout_metrics``, ``guard_nonfinite``: the per-step bookkeeping (the loop is ``trainers.loop``).

Each is a small function or object the recipes compose; the algorithm of a step (advantages,
losses, updates) stays in the recipe.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from posttrain.config.schema import ConfigError, TrainConfig, doc
from posttrain.data.formats import check_prompt_only
from posttrain.data.loading import Row
from posttrain.data.pipeline import load_examples
from posttrain.data.sampler import GlobalBatchSampler
from posttrain.data.tokenize import LengthReport, render_chat
from posttrain.distributed import DistInfo, all_gather_rows, all_reduce_max, all_reduce_sum
from posttrain.errors import DataError
from posttrain.faults import maybe_poison_loss
from posttrain.learner.packing import forward_logits
from posttrain.models.loading import check_model_path, load_tokenizer
from posttrain.trainers.common import check_finite_loss, check_output_dir

log = logging.getLogger("posttrain")


@dataclass
class PromptRow:
    """A prompt (string or messages), its token count, and the row's other columns (for rewards)."""

    prompt: Any
    num_tokens: int
    columns: dict[str, Any]
    where: str


def load_prompts(data_cfg, seed: int, tokenizer, max_prompt_length: int) -> tuple[list[PromptRow], list[PromptRow], LengthReport, dict]:
    """Prompt-only rows; prompts longer than ``max_prompt_length`` tokens follow ``data.overlong``
    (``truncate`` is treated as ``drop``: a cut prompt would ask another question)."""

    def encode(row: Row, report: LengthReport) -> PromptRow | None:
        prompt = row.data["prompt"]
        text = render_chat(tokenizer, prompt, add_generation_prompt=True) if isinstance(prompt, list) else prompt
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if length > max_prompt_length:
            if data_cfg.overlong == "error":
                raise DataError(f"{row.where}: the prompt has {length} tokens, more than "
                                f"max_prompt_length={max_prompt_length}.",
                                hint="Raise it, or set data.overlong=drop to skip such prompts (they are counted).")
            report.dropped_too_long += 1
            return None
        columns = {k: v for k, v in row.data.items() if k != "prompt"}
        return PromptRow(prompt, length, columns, row.where)

    return load_examples(data_cfg, seed, check_prompt_only, encode)


def expand_columns(rows: list[PromptRow], n: int) -> dict[str, list]:
    """Each extra column repeated per sample (n samples per prompt, group-major), for reward functions."""
    names = sorted({k for r in rows for k in r.columns})
    return {name: [r.columns.get(name) for r in rows for _ in range(n)] for name in names}


def reward_completion(prompt: Any, text: str) -> Any:
    """A sample's completion as rewards receive it, as TRL's GRPOTrainer gives it: for a conversational prompt
    (messages) a list of one assistant message, ``[{"role": "assistant", "content": text}]``; else the text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def score_samples(reward_set, rows: list[PromptRow], batch, *, collective: bool = False,
                  trainer_state: Any = None) -> tuple[torch.Tensor, dict[str, float], Any]:
    """Rewards [N] (NaN where every reward abstained), per-reward means, and the raw ``BatchScores``.
    ``collective``: every rank scores its part of one step's batch, so batch statistics of the combination
    (maxmin's objective means) are taken over all of them. ``trainer_state`` (a
    ``reward_models.convention.TrainerState``, or None outside training) reaches every reward."""
    n = batch.n
    prompts = [rows[s.group].prompt for s in batch]
    completions = [reward_completion(p, s.text) for p, s in zip(prompts, batch, strict=True)]
    scores = reward_set.score(prompts, completions, groups=[s.group for s in batch],
                              reduce_sum=all_reduce_sum if collective else None, trainer_state=trainer_state,
                              completion_ids=[s.completion_ids for s in batch], **expand_columns(rows, n))
    totals = torch.tensor([math.nan if t is None else float(t) for t in scores.totals], dtype=torch.float32)
    means = {}
    for label, column in scores.scores.items():
        values = [v for v in column if v is not None and math.isfinite(v)]
        if values:
            means[f"reward/{label}"] = sum(values) / len(values)
    return totals, means, scores


@torch.no_grad()
def evaluate_generation(engine, rows: list[PromptRow], reward_set, *, n: int = 1, temperature: float = 0.0,
                        max_tokens: int | None = None, seed: int = 0, trainer_state: Any = None) -> dict[str, float]:
    """Mean reward and pass@k (share of prompts with at least one sample scoring >= 1) on ``rows``.

    A collective engine (a disaggregated run's ``RemoteEngine``) is called even with no rows: every learner
    rank takes part in its generate."""
    if not rows and not getattr(engine, "collective", False):
        return {}
    batch = engine.generate([r.prompt for r in rows], n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
    if not rows:
        return {}
    rewards, means, _ = score_samples(reward_set, rows, batch, trainer_state=trainer_state)
    finite = torch.nan_to_num(rewards, nan=0.0)
    passed = (finite.view(len(rows), n) >= 1.0).any(dim=1).float().mean().item()
    return {"reward": finite.mean().item(), f"pass@{n}": passed,
            "completion_tokens": batch.num_completion_tokens / max(len(batch), 1), **means}


# Rewards whose score is a pass/fail verdict (1 = correct): their share of 1s is logged as `accuracy`.
VERIFIER_REWARDS = ("math_verify", "unit_test")


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


def global_moments(x: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean, population variance, min and max of the masked entries over every rank."""
    values = x.detach()[mask.bool()].double()
    count, total, total_sq = all_reduce_sum([float(values.numel()), float(values.sum()), float((values * values).sum())])
    high, neg_low = all_reduce_max([float(values.max()) if values.numel() else -float("inf"),
                                    float(-values.min()) if values.numel() else -float("inf")])
    mean = total / max(count, 1.0)
    return {"mean": mean, "var": max(total_sq / max(count, 1.0) - mean * mean, 0.0), "min": -neg_low, "max": high,
            "count": count}


def policy_filtration_keep(strategy: str, rewards: torch.Tensor, n: int, *, seed: int, step: int,
                           rank: int) -> torch.Tensor:
    """This rank's PF-PPO keep mask [B] (``posttrain.algorithms.pf_ppo_filter``), drawn on the step's batch
    gathered from every rank with a generator seeded by the run seed and the step, so 1 and N processes keep
    the same samples. ``rewards`` [B]: this rank's rewards, group-major with ``n`` per prompt. (PF-PPO,
    "Policy Filtration in RLHF to Fine-Tune LLM for Code Generation", Shen et al., 2024.)"""
    from posttrain.algorithms import pf_ppo_filter

    everyone = all_gather_rows(rewards)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    keep = pf_ppo_filter(everyone, n, strategy=strategy, generator=generator)
    first = rank * rewards.shape[0]
    return keep[first : first + rewards.shape[0]]


def mini_batches(local: int, count: int, epochs: int, shuffle_seed: Callable[[int], int] | None = None
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(epoch, rows)`` for each optimizer step of a rollout batch: ``epochs`` passes over this rank's ``local``
    rows, each split into ``count`` mini-batches, in order or, with ``shuffle_seed(epoch)``, freshly shuffled
    by a generator with that seed (so a resumed run shuffles alike)."""
    per_mini = local // count
    for epoch in range(epochs):
        if shuffle_seed is None:
            order = torch.arange(local)
        else:
            order = torch.randperm(local, generator=torch.Generator().manual_seed(shuffle_seed(epoch)))
        for mb in range(count):
            yield epoch, order[mb * per_mini : (mb + 1) * per_mini]


def micro_batches(rows: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """A mini-batch's rows in micro-batches of ``size``."""
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def loss_aggregation(mask: torch.Tensor, *, norm_constant: float, gradient_divisor: float
                     ) -> tuple[dict[str, float], float]:
    """The settings a mini-batch's losses are aggregated with, and its loss tokens over every rank: the loss
    tokens and sequences of ``mask`` (this rank's rows of the mini-batch) summed over every rank (at least 1),
    the constant of ``seq-mean-token-sum-norm`` and the gradient divisor (accumulation steps x ranks)."""
    num_tokens, num_seqs = all_reduce_sum([mask.sum().item(), float((mask.sum(1) > 0).sum())])
    return {"global_num_tokens": max(num_tokens, 1.0), "global_num_seqs": max(num_seqs, 1.0),
            "norm_constant": norm_constant, "gradient_divisor": gradient_divisor}, num_tokens


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


class OnlineRollouts:
    """The rollout side of an online recipe: prompts, the vLLM engine, rewards, sync, evaluation.

    Every (learner) rank holds one and takes a contiguous share of each step's prompts (whole groups stay on
    one rank). A prompt's sampling seed depends only on (run seed, step, its global position), so 1 or N
    processes, either placement, and a resumed run sample the same completions. Colocated, the engine is in
    this process; disaggregated, it is a ``RemoteEngine`` for the rollout ranks (``posttrain.rollout.remote``).
    """

    def __init__(self, cfg, settings: OnlineSettings, dist: DistInfo, tokenizer) -> None:
        self.cfg, self.settings, self.dist, self.tokenizer = cfg, settings, dist, tokenizer
        self.prompts, eval_prompts, self.report, self.skipped = load_prompts(cfg.data, cfg.seed, tokenizer,
                                                                             settings.max_prompt_length)
        self.eval_prompts = eval_prompts[: settings.eval_prompts]
        self.sampler = GlobalBatchSampler(len(self.prompts), settings.prompts_per_step, seed=cfg.seed,
                                          shuffle=cfg.data.shuffle)
        self.rewards = build_rewards(settings)
        self.verifier = next((label for label, reward in self.rewards.rewards.items()
                              if getattr(reward, "name", None) in VERIFIER_REWARDS), None)
        self.engine = None
        # A cap on the training rollouts' completion length below rollout.max_tokens (T-PPO's window); None: none.
        # Evaluation is not capped.
        self.max_tokens: int | None = None
        self.staleness = 0  # policy lag of the last batch, in steps
        self.inflight: tuple[int, int] | None = None  # one-step async: (target step, step it was submitted at)
        self.ready: tuple[int, int, Any] | None = None  # ... and once collected, with its batch
        self.step: int | None = None  # the rollout step of the batch in hand (None before the first)

    def start_engine(self) -> None:
        self._open_engine()
        self.bind_rewards()

    def start(self, learner, *, resumed: bool) -> None:
        """Start the engine; a resumed run's engine then takes the checkpoint's weights (it loaded the initial ones)."""
        self.start_engine()
        if resumed:
            self.sync(learner)

    def bind_rewards(self) -> None:
        """Hand the started engine to the rewards that ask for it: a reward object with a ``bind_engine(engine)``
        method (the ``judge`` reward: ``engine: policy`` judges with it, ``engine: own`` starts its own engine
        then). Rewards in a worker process (``isolation: process``) are not reached."""
        from reward_models import RewardSpec

        specs = [RewardSpec.from_dict(item, f"{self.settings.section}.rewards[{i}]")
                 for i, item in enumerate(self.settings.rewards)]
        for spec, reward in zip(specs, self.rewards.rewards.values(), strict=True):
            bind = getattr(reward.fn, "bind_engine", None)
            if spec.isolation == "thread" and callable(bind):
                bind(self.engine)

    def _open_engine(self) -> None:
        if self.dist.role == "learner":
            from posttrain.rollout.remote import RemoteEngine

            self.engine = RemoteEngine(self.dist, self.cfg.rollout, self.cfg.output_dir)
            return
        from posttrain.rollout import RolloutEngine

        lora = self.cfg.model.lora  # a LoRA learner's engine may serve its adapter (rollout.lora_sync)
        self.engine = RolloutEngine(self.cfg.rollout.model or self.cfg.model.path, self.cfg.rollout,
                                    tokenizer=self.tokenizer, lora_rank=lora.r if lora.enabled else None)
        if self.cfg.rollout.tensor_parallel_size > 1:  # this rank is one shard of its group's engine
            from posttrain.rollout.groups import GenerationGroup
            from posttrain.rollout.layout import Layout

            layout = Layout(self.dist.world_size, self.cfg.rollout.tensor_parallel_size)
            self.engine = GenerationGroup(self.engine, layout, self.dist.rank)

    def rows(self, step: int) -> list[PromptRow]:
        """This rank's contiguous share of the step's prompts."""
        share = self.settings.prompts_per_step // self.dist.world_size
        (ids,) = self.sampler.micro_batches(step, self.dist.rank, self.dist.world_size, share)
        return [self.prompts[i] for i in ids]

    def generate(self, step: int, rows: list[PromptRow]):
        """``rollout.n`` samples per prompt (a ``RolloutBatch``); the engine sleeps afterwards.

        With ``rollout.schedule=one_step_async`` the batch of a step after the first usually comes from the
        prefetch the previous step started (``await_prefetch``), and this call starts the next step's one: the
        rollout ranks generate step t+1 with the weights before step t's update while the learners train on
        step t. ``self.staleness`` is the batch's policy lag in steps (0 on-policy, 1 prefetched)."""
        self.step = step
        if self.ready is not None and self.ready[0] == step:
            _, submitted_at, batch = self.ready
            self.ready = None
        else:  # the first step, a resumed run's first step (its prefetch was not checkpointed), or sync
            submitted_at = step
            batch = self.engine.generate([r.prompt for r in rows], n=self.cfg.rollout.n, seed=self._seed(step),
                                         **self._cap())
            self.engine.sleep()
        self.staleness = step - submitted_at
        if self.cfg.rollout.schedule == "one_step_async" and step + 1 < self.cfg.train.max_steps:
            self.engine.submit([r.prompt for r in self.rows(step + 1)], n=self.cfg.rollout.n, seed=self._seed(step + 1),
                               **self._cap())
            self.inflight = step + 1, step
        return batch

    def _cap(self) -> dict[str, int]:
        """The engine's per-call override of max_tokens for training rollouts, when ``max_tokens`` caps them."""
        return {} if self.max_tokens is None else {"max_tokens": self.max_tokens}

    def _seed(self, step: int, round_: int = 0) -> int:
        """The engine seeds prompt i of a call with seed + i * n. Offsetting by this rank's first global prompt
        makes every prompt's seed depend only on (run seed, step, refill round, global position)."""
        n = self.cfg.rollout.n
        first = self.dist.rank * (self.settings.prompts_per_step // self.dist.world_size)
        return self.cfg.seed * 1_000_003 + step * 100_003 + round_ * 10_000_019 + first * n

    def refill_rows(self, step: int, round_: int) -> list[PromptRow]:
        """This rank's share of the fresh prompts of dynamic-sampling refill round ``round_`` (>= 1)."""
        from posttrain.trainers.dynamic_sampling import refill_prompt_ids

        ids = refill_prompt_ids(len(self.prompts), self.settings.prompts_per_step, seed=self.cfg.seed, step=step,
                                round_=round_)
        share = self.settings.prompts_per_step // self.dist.world_size
        return [self.prompts[i] for i in ids[self.dist.rank * share : (self.dist.rank + 1) * share]]

    def generate_refill(self, step: int, round_: int, rows: list[PromptRow]):
        """``rollout.n`` samples per prompt of a refill round, with the weights that sampled the step."""
        self.await_prefetch()  # one-step async: the batch in flight is answered first (and kept)
        self.step = step
        batch = self.engine.generate([r.prompt for r in rows], n=self.cfg.rollout.n, seed=self._seed(step, round_),
                                     **self._cap())
        self.engine.sleep()
        return batch

    def await_prefetch(self) -> float:
        """Wait for the prefetched batch (one-step async), before the engine may take new requests (weights,
        evaluation); the seconds waited (0 without one): the part of generation training did not hide."""
        if self.inflight is None:
            return 0.0
        started = time.perf_counter()
        target, submitted_at = self.inflight
        self.inflight = None
        self.ready = target, submitted_at, self.engine.collect()
        return time.perf_counter() - started

    @torch.no_grad()
    def greedy_rewards(self, rows: list[PromptRow]) -> torch.Tensor:
        """Rewards [len(rows)] of one greedy (temperature 0) completion per prompt, from the policy that just
        sampled the step: ReMax's baseline. NaN where no reward scored it."""
        batch = self.engine.generate([r.prompt for r in rows], n=1, temperature=0.0)
        self.engine.sleep()
        rewards, _, _ = score_samples(self.rewards, rows, batch, collective=True,
                                      trainer_state=self.trainer_state())
        return rewards

    def score(self, rows: list[PromptRow], batch) -> tuple[torch.Tensor, Any]:
        """Rewards [N] (NaN: unscored) and the raw ``BatchScores``; failures follow ``reward_on_error``."""
        rewards, _, scores = score_samples(self.rewards, rows, batch, collective=True,
                                           trainer_state=self.trainer_state())
        return rewards, scores

    def trainer_state(self, *, evaluation: bool = False):
        """What rewards get as TRL's ``trainer_state``: ``global_step`` is the rollout steps completed before
        the batch being scored (an evaluation comes after its step: it counts that step too)."""
        from reward_models.convention import TrainerState

        done = 0 if self.step is None else self.step + (1 if evaluation else 0)
        return TrainerState(global_step=done, max_steps=self.cfg.train.max_steps,
                            is_world_process_zero=self.dist.is_main,
                            is_local_process_zero=self.dist.local_rank == 0)

    def sync(self, learner):
        """Stream the learner's weights into the engine (LoRA: the adapter alone or merged, per
        rollout.lora_sync); returns ``SyncStats``."""
        from posttrain.rollout import sync_weights

        self.await_prefetch()  # the rollout ranks answer requests in order: the batch in flight comes first
        lora = self.cfg.model.lora
        return sync_weights(self.engine, learner.module, bucket_bytes=self.settings.sync_bucket_mb * 2**20,
                            lora_scaling=lora.alpha / lora.r if lora.enabled else None)

    def sample(self, step: int, timer) -> tuple[list[PromptRow], Any, torch.Tensor, Any]:
        """A step's first stages: this rank's prompts, their samples (``generate``) and rewards (``reward``);
        returns (rows, batch, rewards [N] with NaN where unscored, the raw ``BatchScores``)."""
        with timer.stage("generate"):
            rows = self.rows(step)
            batch = self.generate(step, rows)
        with timer.stage("reward"):
            rewards, scores = self.score(rows, batch)
        return rows, batch, rewards, scores

    def finish_step(self, learner, timer, batch, rewards: torch.Tensor, scores, drift: dict,
                    keep: torch.Tensor) -> dict[str, float]:
        """A step's last stages: wait for the prefetched batch (one-step async; ``generate_wait``, the part of
        generation training did not hide), sync the weights (``sync``); then the step's rollout metrics
        (``rollout_metrics``, ``staleness``, and ``filtered_share``: the share of samples ``keep`` left out)."""
        timer.add("generate_wait", self.await_prefetch())
        with timer.stage("sync"):
            sync = self.sync(learner)
        metrics = rollout_metrics(batch, rewards, scores, drift, sync, timer.finish(), verifier=self.verifier)
        dropped, count = all_reduce_sum([float((~keep).sum()), float(len(batch))])
        metrics.update({"staleness": float(self.staleness), "filtered_share": dropped / max(count, 1.0)})
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy generation on the held-out prompts (sharded over ranks), scored by the run's rewards."""
        rows = self.eval_prompts[self.dist.rank :: self.dist.world_size]
        self.await_prefetch()
        local = evaluate_generation(self.engine, rows, self.rewards, n=1, temperature=0.0,
                                    trainer_state=self.trainer_state(evaluation=True))
        self.engine.sleep()
        keys = ["reward", "pass@1", "completion_tokens"]
        totals = all_reduce_sum([local.get(k, 0.0) * len(rows) for k in keys] + [float(len(rows))])
        count = max(totals[-1], 1)
        return {"accuracy" if k == "pass@1" else k: v / count for k, v in zip(keys, totals[:-1])}

    def close(self) -> None:
        """Stop the reward workers and the engine while the process group still exists (vLLM's own
        exit hook would otherwise tear down its groups after ours are gone)."""
        for part in ("rewards", "engine"):
            if getattr(self, part, None) is not None:
                getattr(self, part).close()


def rollout_metrics(batch, rewards: torch.Tensor, scores, drift: dict, sync, timings: dict[str, float],
                    verifier: str | None = None) -> dict[str, float]:
    """The metrics every online recipe logs for a step, reduced over ranks: rewards (combined and per reward),
    completion lengths and truncation, sampler-vs-learner drift, sync and timings; with a ``verifier`` (the
    label of a pass/fail reward), ``accuracy``: the share of its scored samples with a score of at least 1."""
    finite = rewards[torch.isfinite(rewards)]
    lengths = [len(s.completion_ids) for s in batch]
    truncated = sum(s.finish_reason == "length" for s in batch)
    empty = sum(not s.text.strip() for s in batch)  # scored like any text; usually 0 reward, kept in the loss
    labels = sorted(scores.scores)  # the same reward set, so the same labels, on every rank
    per_reward = []
    for label in labels:
        values = [v for v in scores.scores[label] if v is not None and math.isfinite(v)]
        per_reward += [float(sum(values)), float(len(values))]
    column = scores.scores.get(verifier, []) if verifier is not None else []
    verdicts = [float(v >= 1.0) for v in column if v is not None and math.isfinite(v)]
    sums = all_reduce_sum([finite.sum().item(), float(finite.numel()), float((finite * finite).sum().item()),
                           float(sum(lengths)), float(len(batch)), float(truncated), float(len(scores.issues)),
                           float(sum(verdicts)), float(len(verdicts)), float(empty), *per_reward])
    r_sum, r_count, r_sq, len_sum, count, trunc, issues, a_sum, a_count, empty = sums[:10]
    mean = r_sum / max(r_count, 1)
    metrics = {
        "reward/mean": mean, "reward/std": math.sqrt(max(r_sq / max(r_count, 1) - mean * mean, 0.0)),
        "reward/unscored": count - r_count, "reward/issues": issues,
        **{f"reward/{label}": total / n for label, total, n in zip(labels, sums[10::2], sums[11::2]) if n > 0},
        "completion_tokens": len_sum / max(count, 1), "completion/truncated_share": trunc / max(count, 1),
        "completion/empty_share": empty / max(count, 1),
        **{f"drift/{k}": v for k, v in reduce_drift(drift).items()}, **sync.as_metrics(),
        **{f"time/{k}_s": v for k, v in timings.items()},
        "time/samples_per_s": count / max(timings["step"], 1e-9),
        "time/sync_share": timings["sync"] / max(timings["step"], 1e-9),
    }
    if verifier is not None:
        metrics["accuracy"] = a_sum / max(a_count, 1)
    return metrics


def reduce_drift(drift: dict) -> dict[str, float]:
    """Per-rank drift statistics (``drift_stats``, plus TIS metrics) over every rank: ``tokens`` summed,
    ``*_max`` maximised, the rest token-weighted means."""
    keys = sorted(k for k in drift if k != "tokens")
    tokens = float(drift.get("tokens", 0))
    maxima = [k for k in keys if k.endswith("_max")]
    means = [k for k in keys if k not in maxima]
    summed = all_reduce_sum([tokens] + [float(drift[k]) * tokens for k in means])
    top = all_reduce_max([float(drift[k]) if tokens else -math.inf for k in maxima]) if maxima else []
    out = {k: v / max(summed[0], 1.0) for k, v in zip(means, summed[1:])}
    out.update({k: (v if math.isfinite(v) else 0.0) for k, v in zip(maxima, top)})
    out["tokens"] = summed[0]
    return out


def guard_nonfinite(loss: torch.Tensor, policy: str, what: str, setting: str, *, step: int,
                    last_checkpoint: Path | None, anchor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Apply the non-finite loss policy at (1-based) ``step``: ``stop`` raises ``TrainingDiverged`` naming the
    step and the last checkpoint; ``skip`` returns a stand-in loss whose gradients are exact zeros, and True,
    to be counted. ``setting`` names the recipe key, e.g. ``grpo.nonfinite_loss``.

    The stand-in is ``anchor.sum() * 0`` (``anchor``: this micro-batch's logits or values), not the bad loss
    times 0: back-propagating through a NaN gives NaN gradients even when multiplied by 0.

    Collective: every rank calls it for every micro-batch and all decide together (a rank that stopped alone
    would leave the others waiting in the next all-reduce).
    """
    loss = maybe_poison_loss(step, loss)
    if all_reduce_sum([0.0 if torch.isfinite(loss) else 1.0])[0] == 0:
        return loss, False
    if policy == "stop":
        check_finite_loss(math.nan, step, last_checkpoint, setting=setting)
    return anchor.nan_to_num(0.0, posinf=0.0, neginf=0.0).sum() * 0.0, True


@torch.no_grad()
def old_and_ref_logprobs(learner, reference, tensors: dict[str, torch.Tensor], micro_batch_size: int,
                         temperature: float, *, need_old: bool = True,
                         padding_free: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The learner's log-probs of the sampled tokens before this step's updates (the PPO "old" policy; None
    when not ``need_old``) and the frozen reference's (None without one), ``[B, L]`` in ``token_logprobs``'
    layout."""
    from posttrain.rollout import token_logprobs

    old, ref = [], []
    if not need_old and reference is None:
        return None, None
    learner.eval()
    for start in range(0, tensors["input_ids"].shape[0], micro_batch_size):
        part = {k: v[start : start + micro_batch_size] for k, v in tensors.items()}
        if need_old:
            logits = forward_logits(learner, part["input_ids"], part["attention_mask"], padding_free=padding_free)
            old.append(token_logprobs(logits, part["input_ids"], part["completion_mask"], temperature=temperature))
        if reference is not None:
            ref_logits = reference.logits(part["input_ids"], part["attention_mask"], padding_free=padding_free)
            ref.append(token_logprobs(ref_logits, part["input_ids"], part["completion_mask"], temperature=temperature))
    learner.train()
    return (torch.cat(old) if old else None), (torch.cat(ref) if ref else None)
