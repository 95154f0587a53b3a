"""The rollout side of an online recipe: prompts, the engine, rewards, weight sync and evaluation."""

from __future__ import annotations

from typing import Any

import torch

from posttrain.data.sampler import GlobalBatchSampler
from posttrain.distributed import DistInfo, all_reduce_sum
from posttrain.trainers.online.engines import bind_engine, open_engine
from posttrain.trainers.online.metrics import rollout_metrics
from posttrain.trainers.online.prefetch import Prefetcher
from posttrain.trainers.online.prompts import (
    VERIFIER_REWARDS,
    PromptRow,
    evaluate_generation,
    load_prompts,
    score_samples,
)
from posttrain.trainers.online.settings import OnlineSettings, build_rewards


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
        self.prefetch: Prefetcher | None = None  # one-step async: the next step's batch, generated ahead
        self.step: int | None = None  # the rollout step of the batch in hand (None before the first)

    def start_engine(self) -> None:
        self.engine = open_engine(self.cfg, self.dist, self.tokenizer)
        if self.cfg.rollout.schedule == "one_step_async":
            self.prefetch = Prefetcher(self.engine)
        bind_engine(self.rewards, self.settings, self.engine)

    def start(self, learner, *, resumed: bool) -> None:
        """Start the engine; a resumed run's engine then takes the checkpoint's weights (it loaded the initial ones)."""
        self.start_engine()
        if resumed:
            self.sync(learner)

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
        prefetched = self.prefetch.take(step) if self.prefetch is not None else None
        if prefetched is not None:
            batch, submitted_at = prefetched.batch, prefetched.submitted_at
        else:  # sync, the first step, or a resumed run's first step (its prefetch was not checkpointed)
            submitted_at = step
            batch = self.engine.generate([r.prompt for r in rows], n=self.cfg.rollout.n, seed=self._seed(step),
                                         **self._cap())
            self.engine.sleep()
        self.staleness = step - submitted_at
        if self.prefetch is not None and step + 1 < self.cfg.train.max_steps:
            self.prefetch.submit(step + 1, step, [r.prompt for r in self.rows(step + 1)], n=self.cfg.rollout.n,
                                 seed=self._seed(step + 1), **self._cap())
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
        """Collect the batch in flight (one-step async) before the engine may take new requests (weights,
        evaluation, a refill round); the seconds waited, 0 without one."""
        return 0.0 if self.prefetch is None else self.prefetch.wait()

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
