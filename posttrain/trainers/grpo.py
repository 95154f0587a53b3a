"""Group-relative policy optimisation (GRPO) and its variants, with vLLM rollouts in the learner's process.

Supports:
  - n samples per prompt from a vLLM engine colocated with the learner (every rank holds an engine and
    generates its share of the prompts); the engine's weights are synced from the learner every step
  - rewards from ``reward_models`` (several, weighted; failures per ``grpo.reward_on_error``)
  - any advantage estimator (``grpo``, ``dr_grpo``, ``rloo``, ``reinforce_pp_baseline``, ``bnpo``, ``spo``, ...)
    and policy loss (``ppo`` with clip-higher / dual-clip, ``gspo``, ``cispo``, ``clip_cov``, ``kl_cov``)
    from ``posttrain.algorithms``; loss aggregation modes with global-batch normalisation
  - KL to a frozen reference in the loss or in the reward; entropy bonus; DAPO dynamic sampling (groups with
    identical rewards carry no signal and are left out, counted); truncated importance sampling between
    the sampler's and the learner's log-probs; several optimisation epochs and mini-batches per rollout
  - DeepSpeed ZeRO 0-3, LoRA, 1..N processes, colocated or disaggregated placement (``rollout.placement``),
    checkpoints and exact ``resume=auto`` on CPU
  - disaggregated, a one-step-async schedule (``rollout.schedule=one_step_async``): step t+1 is generated
    while step t trains, one policy version stale (``staleness``), corrected by ``grpo.tis_cap``; a resumed
    run regenerates the batch that was in flight

Assumes:
  - prompt-only data (``prompt`` plus columns the rewards read, e.g. ``answer``)
  - ``train.max_steps`` rollout steps; ``train.global_batch_size`` sequences per optimizer step

DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models (Shao et al., 2024);
HybridFlow: A Flexible and Efficient RLHF Framework (Sheng et al., 2024) for the colocated design;
Asynchronous RLHF: Faster and More Efficient Off-Policy RL for Language Models (Noukhovitch et al., 2024)
for the one-step-async schedule.
"""

from __future__ import annotations

import logging

import torch

from posttrain import algorithms
from posttrain.distributed import DistInfo, all_gather_objects
from posttrain.learner.logprobs import drift_stats
from posttrain.models.loading import load_tokenizer
from posttrain.trainers import online
from posttrain.trainers.common import check_output_dir, seed_everything
from posttrain.trainers.dynamic_sampling import refill
from posttrain.trainers.grpo_advantages import (
    advance_spo,
    baseline_metrics,
    kl_in_reward,
    prompt_keys,
    samples_kept,
    sequence_advantages,
    token_advantages,
)
from posttrain.trainers.grpo_config import Config, GRPOSettings, batch_plan, preflight
from posttrain.trainers.grpo_update import micro_batch_loss, single_pass, update_metrics, update_policy
from posttrain.trainers.hapo import HAPOShaping
from posttrain.trainers.harness import RunHarness, run_identity
from posttrain.trainers.loop import train_online
from posttrain.trainers.online import OnlineRollouts
from posttrain.trainers.policy import build_policy, build_reference
from posttrain.trainers.timing import StageTimer

__all__ = ["Config", "GRPOSettings", "Recipe", "batch_plan", "micro_batch_loss", "preflight"]

log = logging.getLogger("posttrain")


class Recipe:
    def __init__(self, cfg: Config, dist: DistInfo, source: str = "the recipe") -> None:
        self.cfg, self.dist, self.source = cfg, dist, source

    def setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        seed_everything(cfg.seed)
        check_output_dir(cfg)
        self.plan = batch_plan(cfg, dist.world_size, self.source)
        self.tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
        self.rollouts = OnlineRollouts(cfg, cfg.grpo, dist, self.tokenizer)
        self.hapo = (HAPOShaping(cfg.grpo.hapo, self.rollouts.rewards.labels, self.rollouts.verifier, dist)
                     if cfg.grpo.hapo.enabled else None)
        self.total_steps = cfg.train.max_steps
        log.info("prompts: %d train / %d eval; %s; invalid rows skipped: %s; %d steps of %d prompts x %d samples, "
                 "%d optimizer steps", len(self.rollouts.prompts), len(self.rollouts.eval_prompts),
                 self.rollouts.report.summary(), self.rollouts.skipped or "none", self.total_steps,
                 cfg.grpo.prompts_per_step, cfg.rollout.n, self.plan["optimizer_steps"])
        self.learner = build_policy(cfg, dist, self.plan["grad_accum"], self.plan["optimizer_steps"])
        self.reference = build_reference(cfg, self.learner) if cfg.grpo.kl_coef else None  # KL needs it
        self.spo = algorithms.SPOValueTracker() if cfg.grpo.estimator == "spo" else None
        self.run = RunHarness(cfg, dist, run_identity(cfg, estimator=cfg.grpo.estimator, n=cfg.rollout.n,
                                                      prompts_per_step=cfg.grpo.prompts_per_step))
        state = self.run.restore(self.learner)
        if self.spo is not None and state.get("spo"):
            self.spo.load_state_dict(state["spo"])
        if self.hapo is not None and state.get("hapo"):
            self.hapo.load_state_dict(state["hapo"])
        self.run.open_metrics()
        self.rollouts.start(self.learner, resumed=self.run.start_step > 0)

    def train(self) -> dict:
        return train_online(self, [["reward/mean", "eval/reward"], ["eval/accuracy"], ["kl"], ["entropy"],
                                   ["time/samples_per_s"], ["drift/abs_diff_max"], ["completion_tokens"]])

    def cleanup(self) -> None:
        if getattr(self, "rollouts", None) is not None:
            self.rollouts.close()

    def save(self, step: int) -> None:
        state = {"total_steps": self.total_steps}
        if self.spo is not None:
            state["spo"] = self.spo.state_dict()
        if self.hapo is not None:
            state["hapo"] = self.hapo.state_dict()
        self.run.save(step, self.learner, self.tokenizer, state=state)

    def rl_step(self, step: int) -> dict:
        """One rollout step as its stages: rows, generate, score (``sample``), refill (DAPO), shape (HAPO),
        baseline (ReMax); then, timed as ``train``: log-probs, KL in the reward, advantages, the samples kept,
        rollout correction, update, drift, SPO's tracker; then sync and the step's metrics (``finish_step``)."""
        cfg, g, n = self.cfg, self.cfg.grpo, self.cfg.rollout.n
        timer = StageTimer()
        rows, batch, rewards, scores = self.rollouts.sample(step, timer)
        rows, batch, rewards, scores, refill_metrics = refill(self.rollouts, g, self.dist, step, timer,
                                                              rows, batch, rewards, scores)
        rewards, hapo_metrics = self._shape(rows, batch, rewards, scores)
        baseline = self._greedy_baseline(rows, timer)
        with timer.stage("train"):
            tensors = batch.collate(self.tokenizer.pad_token_id)
            mask = tensors["completion_mask"].float()
            old, ref = self._logprobs(tensors)
            penalized, reward_kl = kl_in_reward(g, rewards, old, ref, mask)
            keys = all_gather_objects(prompt_keys(rows, n)) if self.spo is not None else None
            advantages = self._advantages(rewards, penalized, old, ref, mask, baseline, keys)
            keep = samples_kept(g, rewards, n, seed=cfg.seed, step=step, rank=self.dist.rank)
            weights, tis_metrics = self._correction(old, tensors["sampler_logprobs"], mask)
            update = update_policy(self.learner, cfg, self.plan, tensors, old, ref, advantages,
                                   mask * keep[:, None].float(), weights, step=step, world_size=self.dist.world_size,
                                   last_checkpoint=self.run.last_checkpoint)
            learner_logprobs = old if old is not None else update.logprobs
            drift = {**drift_stats(tensors["sampler_logprobs"], learner_logprobs, mask), **tis_metrics}
            spo_metrics = self._advance_spo(keys, rewards, tensors, learner_logprobs, mask)
        metrics = self.rollouts.finish_step(self.learner, timer, batch, penalized, scores, drift, keep)
        metrics.update(update_metrics(update, self.learner, reward_kl), **spo_metrics, **refill_metrics,
                       **hapo_metrics, **baseline_metrics(baseline))
        return metrics

    def _shape(self, rows, batch, rewards: torch.Tensor, scores) -> tuple[torch.Tensor, dict[str, float]]:
        """HAPO: + weight x the history-aware length reward; then the history takes this step."""
        return (rewards, {}) if self.hapo is None else self.hapo.shape(rows, batch, rewards, scores)

    def _greedy_baseline(self, rows, timer: StageTimer) -> torch.Tensor | None:
        """ReMax's baseline: each prompt's greedy completion's reward, per sample (timed as ``generate``)."""
        if "baseline_rewards" not in self.cfg.grpo.estimator_needs():
            return None
        with timer.stage("generate"):
            return self.rollouts.greedy_rewards(rows).repeat_interleave(self.cfg.rollout.n)

    def _logprobs(self, tensors) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The old (None in single-pass mode: the update computes them) and reference (None without one)
        log-probs of the sampled tokens."""
        return online.old_and_ref_logprobs(self.learner, self.reference, tensors, self.cfg.train.micro_batch_size,
                                           max(self.cfg.rollout.temperature, 1e-6), need_old=not single_pass(self.cfg, self.plan),
                                           padding_free=self.cfg.grpo.padding_free)

    def _advantages(self, rewards, penalized, old, ref, mask, baseline, keys) -> torch.Tensor:
        """Token-level estimators take the task rewards and place the KL per token themselves; sequence ones take
        the rewards after any KL penalty."""
        g = self.cfg.grpo
        if g.token_level:
            return token_advantages(g, rewards, old, ref, mask)
        return sequence_advantages(g, penalized, self.cfg.rollout.n, mask, rank=self.dist.rank,
                                   baseline_rewards=baseline, tracker=self.spo, keys=keys)

    def _correction(self, old, sampler_logprobs, mask) -> tuple[torch.Tensor | None, dict[str, float]]:
        correction = self.cfg.grpo.correction()
        return correction.weights(old, sampler_logprobs, mask) if correction.enabled else (None, {})

    def _advance_spo(self, keys, rewards, tensors, before, mask) -> dict[str, float]:
        """SPO: the tracker takes the step's rewards and the policy's movement, measured on its batch after the
        update."""
        if self.spo is None:
            return {}
        after, _ = online.old_and_ref_logprobs(self.learner, None, tensors, self.cfg.train.micro_batch_size,
                                               max(self.cfg.rollout.temperature, 1e-6), need_old=True,
                                               padding_free=self.cfg.grpo.padding_free)
        return advance_spo(self.spo, keys, rewards, before, after, mask)
