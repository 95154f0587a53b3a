"""Proximal policy optimisation with a learned critic (PPO for RLHF), with vLLM rollouts in the learner's process.

Supports:
  - rollout.n samples per prompt (1 is the classic setting) from a vLLM engine colocated with the learner,
    synced from the learner every step (the rollout side is GRPO's: ``posttrain.trainers.online``)
  - rewards from ``reward_models``: verifiers such as ``math_verify``, an ``orm`` reward model, or any
    weighted mix; failures follow ``ppo.reward_on_error``
  - a critic: a value model with a per-token scalar head (``AutoModelForTokenClassification``, 1 label),
    initialised from the policy checkpoint (new head) or from a reward model trained by the ``rm``
    trainer (its backbone and ``score`` head, applied at every token); its own DeepSpeed learner and lr
  - PPO-max: score normalisation by running statistics and clipping, a per-token KL penalty in the reward,
    GAE, advantage whitening over the whole batch (all ranks), the clipped policy loss, the clipped value
    loss, a fixed or adaptive KL coefficient, several epochs of shuffled mini-batches per rollout
  - T-PPO (``ppo.truncated``): generation within a window of tokens; responses the window cuts are incomplete,
    their advantages come from extended GAE bootstrapped at the critic's value of the last generated state, and
    the value loss trains on finished responses only (towards their lambda-``value_lam`` returns)
  - DeepSpeed ZeRO 0-3 (policy and critic alike), LoRA for the policy, 1..N processes, colocated or
    disaggregated placement (``rollout.placement``); checkpoints hold the
    policy, the critic (``critic/``, a Hugging Face directory), both optimizer states, the KL coefficient
    and the reward statistics, and ``resume=auto`` continues exactly

Assumes:
  - prompt-only data (``prompt`` plus columns the rewards read, e.g. ``answer``)
  - ``train.max_steps`` rollout steps; ``train.global_batch_size`` sequences per optimizer step (mini-batch)
  - one scalar score per completion (outcome reward)

One step, for completion tokens t = 1..T_i of sample i (``old``: the learner before this step's updates):

    s_i      = clip((score_i - mu) / sigma, -c, c)            mu, sigma: running statistics of every score so far
    r_t      = -beta * k(log pi_old(y_t), log pi_ref(y_t)) + [t = T_i] * s_i          k = k1 = logp - ref_logp
    V_t      = critic(prefix before y_t)
    delta_t  = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},   R_t = A_t + V_t
    A_t     <- (A_t - mean A) / std A                          over every completion token of the step
    L_policy = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi(y_t) / pi_old(y_t)
    L_value  = 0.5 mean_t max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -eps_v, eps_v) - R_t)^2)
    beta    <- beta * (1 + clip(KL / KL_target - 1, -0.2, 0.2) * n / horizon)      (adaptive; n samples)

T-PPO (``ppo.truncated.enabled``), for a response cut at the window after T tokens (incomplete, c_i = 1):

    r_t      = -beta * k(...)  only: no outcome reward s_i before completion (nor in the running statistics)
    V_{T+1}  = c_i * V(s_T)                                  V(s_T): the critic at the last generated token
    A_t      = sum_{k=0}^{T-t} (gamma lam)^k delta_{t+k}     extended GAE; exactly GAE for finished responses
    L_value  over the tokens of finished responses only, towards R_t of GAE with lambda = truncated.value_lam

Secrets of RLHF in Large Language Models Part I: PPO (Zheng et al., 2023) for PPO-max;
Training language models to follow instructions with human feedback (Ouyang et al., 2022);
Fine-Tuning Language Models from Human Preferences (Ziegler et al., 2019) for the adaptive KL controller;
High-Dimensional Continuous Control Using Generalized Advantage Estimation (Schulman et al., 2015);
Proximal Policy Optimization Algorithms (Schulman et al., 2017);
Truncated Proximal Policy Optimization (Fan et al., 2025, arXiv:2506.15050) for T-PPO and extended GAE.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from posttrain import algorithms
from posttrain.distributed import DistInfo
from posttrain.models.loading import load_tokenizer
from posttrain.rollout import drift_stats
from posttrain.trainers import online
from posttrain.trainers.common import check_output_dir, seed_everything
from posttrain.trainers.harness import RunHarness, run_identity
from posttrain.trainers.loop import train_online
from posttrain.trainers.online import OnlineRollouts
from posttrain.trainers.policy import build_policy, build_reference
from posttrain.trainers.ppo_advantages import (
    advantages_and_returns,
    critic_metrics,
    incomplete_responses,
    kl_and_shaped_means,
    shape_scores,
    truncation_metrics,
    value_lam,
    whiten,
)
from posttrain.trainers.ppo_config import Config, PPOSettings, batch_plan, check_critic_source, preflight
from posttrain.trainers.ppo_critic import (
    build_critic,
    critic_values,
    final_state_values,
    load_critic,
    token_values,
)
from posttrain.trainers.ppo_update import Targets, update_actor_critic
from posttrain.trainers.timing import StageTimer

__all__ = ["Config", "PPOSettings", "Recipe", "batch_plan", "check_critic_source", "final_state_values", "load_critic",
           "preflight", "token_values"]

log = logging.getLogger("posttrain")


class Recipe:
    def __init__(self, cfg: Config, dist: DistInfo, source: str = "the recipe") -> None:
        self.cfg, self.dist, self.source = cfg, dist, source

    def setup(self) -> None:
        cfg, dist, p = self.cfg, self.dist, self.cfg.ppo
        seed_everything(cfg.seed)
        check_output_dir(cfg)
        self.plan = batch_plan(cfg, dist.world_size, self.source)
        check_critic_source(cfg)
        self.tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
        self.rollouts = OnlineRollouts(cfg, p, dist, self.tokenizer)
        self.rollouts.max_tokens = p.truncated.generation_cap(cfg.rollout.max_tokens)  # T-PPO: the window
        if p.truncated.enabled:
            log.info("T-PPO: generation window %d tokens (rollout.max_tokens %d); extended GAE on the incomplete "
                     "responses, the value loss on finished ones", self.rollouts.max_tokens, cfg.rollout.max_tokens)
        self.total_steps = cfg.train.max_steps
        log.info("prompts: %d train / %d eval; %s; invalid rows skipped: %s; %d steps of %d prompts x %d samples, "
                 "%d optimizer steps", len(self.rollouts.prompts), len(self.rollouts.eval_prompts),
                 self.rollouts.report.summary(), self.rollouts.skipped or "none", self.total_steps,
                 p.prompts_per_step, cfg.rollout.n, self.plan["optimizer_steps"])
        self.learner = build_policy(cfg, dist, self.plan["grad_accum"], self.plan["optimizer_steps"])
        self.critic = build_critic(cfg, dist, self.plan, self.tokenizer.pad_token_id)
        self.reference = build_reference(cfg, self.learner) if cfg.ppo.kl_coef else None  # KL needs it
        self.kl_controller = algorithms.make_kl_controller(
            "fixed" if p.kl_target is None else "adaptive", coef=p.kl_coef, target=p.kl_target, horizon=p.kl_horizon)
        self.reward_stats = algorithms.RunningMoments()
        self.run = RunHarness(cfg, dist, run_identity(cfg, n=cfg.rollout.n, prompts_per_step=p.prompts_per_step,
                                                      critic_init=p.critic.init, critic_path=p.critic.path))
        state = self.run.restore(self.learner, extra={"critic": self.critic})
        if state:
            self.kl_controller.load_state_dict(state["kl_controller"])
            self.reward_stats.load_state_dict(state["reward_stats"])
        self.run.open_metrics()
        self.rollouts.start(self.learner, resumed=self.run.start_step > 0)

    def train(self) -> dict:
        return train_online(self, [["reward/mean", "eval/reward"], ["accuracy", "eval/accuracy"], ["kl"],
                                   ["kl_coef"], ["policy_loss"], ["value_loss"], ["explained_variance"], ["entropy"],
                                   ["clipfrac", "vf_clipfrac"], ["time/samples_per_s"]])

    def cleanup(self) -> None:
        if getattr(self, "rollouts", None) is not None:
            self.rollouts.close()

    def save(self, step: int) -> None:
        state = {"total_steps": self.total_steps, "kl_controller": self.kl_controller.state_dict(),
                 "reward_stats": self.reward_stats.state_dict()}
        self.run.save(step, self.learner, self.tokenizer, state=state, extra={"critic": self.critic})

    def rl_step(self, step: int) -> dict:
        """One rollout step as its stages: rows, generate, score (``sample``); then, timed as ``train``: the loss
        tokens, log-probs, values, shaped scores, KL-penalised token rewards, advantages and returns, whitening,
        drift and rollout correction, the update of policy and critic; then sync and the step's metrics."""
        cfg, p = self.cfg, self.cfg.ppo
        timer = StageTimer()
        _rows, batch, scores, raw_scores = self.rollouts.sample(step, timer)
        with timer.stage("train"):
            tensors = batch.collate(self.tokenizer.pad_token_id)
            mask = tensors["completion_mask"].float()
            incomplete = incomplete_responses(p.truncated.enabled, batch)  # T-PPO: responses its window cut
            keep, loss_mask = self._loss_mask(step, scores, incomplete, mask)
            old_logprobs, ref_logprobs = online.old_and_ref_logprobs(
                self.learner, self.reference, tensors, cfg.train.micro_batch_size, max(cfg.rollout.temperature, 1e-6),
                padding_free=p.padding_free)
            old_values, final_values = critic_values(self.critic, tensors, cfg.train.micro_batch_size,
                                                     padding_free=p.padding_free)
            beta = self.kl_controller.value
            # T-PPO: the outcome reward exists only at completion; an incomplete response gets none (nor counts in
            # the running statistics): its last token's reward is the KL penalty alone, its return bootstrapped.
            shaped = shape_scores(p, self.reward_stats, scores.masked_fill(incomplete, float("nan")))
            ref = ref_logprobs if ref_logprobs is not None else old_logprobs  # no reference: no penalty
            token_kl = algorithms.kl_estimate(p.kl_estimator, old_logprobs, ref)
            token_rewards = algorithms.kl_penalized_rewards(shaped, old_logprobs, ref, loss_mask, coef=beta,
                                                            kind=p.kl_estimator)
            advantages, returns, value_mask = advantages_and_returns(p, token_rewards, old_values, final_values,
                                                                     loss_mask, incomplete)
            whitened, advantage_stats = whiten(p, advantages, loss_mask)
            weights, drift = self._drift(tensors, old_logprobs, mask, loss_mask)
            if p.save_batches:
                self._save_batch(step, {"scores": scores, "shaped_scores": shaped, "loss_mask": loss_mask,
                                        "logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "token_kl": token_kl,
                                        "values": old_values, "token_rewards": token_rewards,
                                        "advantages": advantages, "whitened_advantages": whitened, "returns": returns,
                                        "kl_coef": beta, "gamma": p.gamma, "lam": p.lam,
                                        "input_ids": tensors["input_ids"], "truncated": incomplete,
                                        "final_values": final_values, "value_mask": value_mask,
                                        "value_lam": value_lam(p)})
            targets = Targets(old_logprobs, whitened, old_values, returns, loss_mask, value_mask, weights)
            update = update_actor_critic(self.learner, self.critic, cfg, self.plan, tensors, targets, step=step,
                                         rank=self.dist.rank, world_size=self.dist.world_size,
                                         last_checkpoint=self.run.last_checkpoint)
        metrics = self.rollouts.finish_step(self.learner, timer, batch, scores, raw_scores, drift, keep)
        kl, shaped_mean, seqs = kl_and_shaped_means(token_kl, shaped, loss_mask)
        metrics.update({"kl": kl, "kl_coef": beta, "reward/shaped_mean": shaped_mean,
                        "reward/running_mean": self.reward_stats.mean, "reward/running_std": self.reward_stats.std,
                        **critic_metrics(advantage_stats, returns, old_values, loss_mask, value_mask),
                        **update, "lr": self.learner.lr, "critic_lr": self.critic.lr})
        for key, learner in (("grad_norm", self.learner), ("critic_grad_norm", self.critic)):
            if learner.grad_norm is not None:
                metrics[key] = learner.grad_norm
        if p.truncated.enabled:
            metrics.update(truncation_metrics(self.rollouts.max_tokens, scores, incomplete, final_values, loss_mask,
                                              value_mask))
        if p.kl_target is not None:
            self.kl_controller.update(kl, n_steps=int(seqs))
        return metrics

    def _loss_mask(self, step: int, scores: torch.Tensor, incomplete: torch.Tensor, mask: torch.Tensor):
        """(the samples PF-PPO keeps [B], the loss tokens [B, L]). A sample no reward scored carries no signal: it
        is left out of the losses (counted in reward/unscored). An incomplete response needs no score: T-PPO
        bootstraps it from the critic."""
        p = self.cfg.ppo
        loss_mask = mask * (torch.isfinite(scores) | incomplete)[:, None].float()
        keep = torch.ones(len(scores), dtype=torch.bool)
        if p.pf_ppo != "off":  # PF-PPO: only the most reliably rewarded samples of each prompt train
            keep = online.policy_filtration_keep(p.pf_ppo, scores, self.cfg.rollout.n, seed=self.cfg.seed,
                                                 step=step, rank=self.dist.rank)
            loss_mask = loss_mask * keep[:, None].float()
        return keep, loss_mask

    def _drift(self, tensors, old_logprobs, mask, loss_mask) -> tuple[torch.Tensor | None, dict[str, float]]:
        """(the rollout correction's weights, None when off; sampler-vs-learner drift and the correction's
        metrics)."""
        correction = self.cfg.ppo.rollout_correction
        drift = drift_stats(tensors["sampler_logprobs"], old_logprobs, mask)
        if not correction.enabled:
            return None, drift
        weights, tis_metrics = correction.weights(old_logprobs, tensors["sampler_logprobs"], loss_mask)
        return weights, {**drift, **tis_metrics}

    def _save_batch(self, step: int, tensors: dict) -> None:
        directory = Path(self.cfg.output_dir) / "batches"
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, directory / f"step-{step + 1:06d}-rank-{self.dist.rank}.pt")
