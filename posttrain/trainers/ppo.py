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

import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from posttrain import algorithms
from posttrain.config.schema import ConfigError, doc
from posttrain.distributed import DistInfo, all_reduce_sum
from posttrain.errors import UserError
from posttrain.learner import build_learner
from posttrain.learner.packing import forward_logits
from posttrain.models.loading import check_model_path, load_tokenizer
from posttrain.rollout import RolloutConfig, drift_stats, token_entropy, token_logprobs
from posttrain.rollout.layout import check_layout
from posttrain.trainers import online
from posttrain.trainers.common import RecipeConfig, check_output_dir, seed_everything
from posttrain.trainers.harness import RunHarness, run_identity
from posttrain.trainers.loop import train_loop
from posttrain.trainers.online import OnlineRollouts, OnlineSettings
from posttrain.trainers.policy import build_policy, build_reference
from posttrain.trainers.reference import FrozenReference
from posttrain.trainers.timing import StageTimer

log = logging.getLogger("posttrain")


@dataclass
class CriticSettings:
    init: Literal["policy", "reward_model"] = doc(
        "policy", "Where the critic starts: the policy checkpoint (model.path) with a new value head, or a reward "
        "model (critic.path) whose backbone and score head are applied at every token.")
    path: str | None = doc(None, "Reward model directory for init: reward_model (a 1-label sequence-classification "
                           "model, e.g. an `rm` run's checkpoints/last/model).")
    lr: float = doc(1e-5, "Critic learning rate; its other optimizer settings follow learner.*.")
    pretrain_steps: int = doc(0, "Rollout steps at the start in which only the critic trains (the policy is frozen), "
                              "so the first policy updates see fitted values.")

    def validate(self, source: str) -> None:
        if self.init == "reward_model" and not self.path:
            raise ConfigError(f"ppo.critic.init is 'reward_model' in {source} but ppo.critic.path is not set.",
                              hint="Point ppo.critic.path at a reward model directory saved by the rm trainer.")
        if self.init == "policy" and self.path:
            raise ConfigError(f"ppo.critic.path is set in {source} but ppo.critic.init is 'policy'.",
                              hint="Set ppo.critic.init=reward_model to start the critic from that reward model.")
        if self.lr <= 0:
            raise ConfigError(f"ppo.critic.lr in {source} must be positive, got {self.lr}.")
        if self.pretrain_steps < 0:
            raise ConfigError(f"ppo.critic.pretrain_steps in {source} must be 0 or more, got {self.pretrain_steps}.")


@dataclass
class TruncatedSettings:
    """T-PPO ("Truncated Proximal Policy Optimization", Fan et al., 2025, arXiv:2506.15050): generation is capped
    at a window of ``window`` tokens; a response the window cut (finish_reason "length") is incomplete. Its
    advantages come from extended GAE (``posttrain.algorithms.egae_advantages``), which bootstraps from the
    critic's value of the last generated state instead of treating the cut as terminal; it earns no outcome
    reward (the score exists only at completion) and stays out of the value loss, which trains on finished
    responses alone, towards their lambda-``value_lam`` returns. Incomplete responses are not continued in a later
    step (the paper's successive batching): docs/rl.md."""

    enabled: bool = doc(False, "Train with T-PPO: generate within ppo.truncated.window tokens, extended GAE on the "
                        "incomplete responses, the value loss on finished ones only (docs/rl.md).")
    window: int | None = doc(None, "The generation window in tokens (at most rollout.max_tokens); a response not "
                             "finished within it is incomplete. null: rollout.max_tokens.")
    value_lam: float | None = doc(1.0, "Lambda of the critic's targets on finished responses: 1 gives Monte Carlo "
                                  "returns, unbiased, as T-PPO trains its value model (decoupled from the policy's "
                                  "ppo.lam); null: ppo.lam.")

    def validate(self, source: str) -> None:
        if not self.enabled and self.window is not None:
            raise ConfigError(f"ppo.truncated.window is set in {source} but ppo.truncated.enabled is false.",
                              hint="Set ppo.truncated.enabled=true to train with T-PPO, or remove the window.")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"ppo.truncated.window in {source} must be at least 1 or null, got {self.window}.")
        if self.value_lam is not None and not 0 <= self.value_lam <= 1:
            raise ConfigError(f"ppo.truncated.value_lam in {source} must be in [0, 1] or null, got {self.value_lam}.")

    def check_window(self, max_tokens: int, source: str) -> None:
        """The window may not exceed ``rollout.max_tokens``, the longest response the run allows."""
        if self.enabled and self.window is not None and self.window > max_tokens:
            raise ConfigError(f"ppo.truncated.window ({self.window}) in {source} is larger than rollout.max_tokens "
                              f"({max_tokens}).", hint="Lower the window, or raise rollout.max_tokens.")

    def generation_cap(self, max_tokens: int) -> int | None:
        """The completion-length cap of the training rollouts: the window when enabled, else None (no cap)."""
        if not self.enabled:
            return None
        return max_tokens if self.window is None else self.window


@dataclass
class PPOSettings(OnlineSettings):
    section: ClassVar[str] = "ppo"

    epochs: int = doc(2, "PPO epochs: optimisation passes over each rollout batch, in freshly shuffled mini-batches.")
    clip_range: float = doc(0.2, "Policy ratio clip: rho is clipped to [1 - clip_range, 1 + clip_range].")
    value_clip: float | None = doc(0.2, "Value clip: new values are clipped to old +- value_clip in the value loss (null: no clipping).")
    gamma: float = doc(1.0, "GAE discount over completion tokens.")
    lam: float = doc(0.95, "GAE lambda.")
    kl_coef: float = doc(0.05, "KL coefficient beta of the per-token KL penalty in the reward (its start value when adaptive); 0: no reference model is loaded.")
    kl_estimator: str = doc("k1", "Per-token KL estimator of the penalty: k1 (logp - ref_logp, as PPO-max), k2, k3, low_var_kl.")
    kl_target: float | None = doc(None, "Adaptive KL controller (Ziegler et al., 2019): the per-sequence KL to steer towards; null keeps beta fixed.")
    kl_horizon: float = doc(10000.0, "Adaptive KL controller horizon, in samples.")
    reward_norm: bool = doc(True, "Normalise scores by the running mean and std of every score so far (PPO-max).")
    reward_clip: float | None = doc(5.0, "Clip (normalised) scores to [-reward_clip, reward_clip]; null: no clipping.")
    whiten_advantages: bool = doc(True, "Whiten advantages over every completion token of the step (all ranks).")
    loss_agg: str = doc("token-mean", "Aggregation of the policy and value losses: token-mean, seq-mean-token-mean, ...")
    entropy_coef: float = doc(0.0, "Entropy bonus weight (entropy is logged either way).")
    save_batches: bool = doc(False, "Write each step's per-token tensors (scores, KL, values, rewards, advantages, "
                             "returns, masks) to <output_dir>/batches/ for inspection.")
    critic: CriticSettings = doc(CriticSettings, "The value model.")
    truncated: TruncatedSettings = doc(TruncatedSettings, "T-PPO: a generation window, extended GAE on incomplete "
                                       "responses, the value loss on finished ones (docs/rl.md).")

    def validate(self, source: str) -> None:
        super().validate(source)
        for registry, name, key in ((algorithms.LOSS_AGGREGATIONS, self.loss_agg, "loss_agg"),
                                    (algorithms.KL_ESTIMATORS, self.kl_estimator, "kl_estimator")):
            if name not in registry:
                raise ConfigError(f"ppo.{key} in {source}: {registry.unknown_message(name)}")
        checks = [(self.epochs >= 1, "epochs", "at least 1"), (self.clip_range > 0, "clip_range", "positive"),
                  (self.value_clip is None or self.value_clip > 0, "value_clip", "positive or null"),
                  (0 <= self.gamma <= 1, "gamma", "in [0, 1]"), (0 <= self.lam <= 1, "lam", "in [0, 1]"),
                  (self.kl_coef >= 0, "kl_coef", "0 or more"),
                  (self.kl_target is None or self.kl_target > 0, "kl_target", "positive or null"),
                  (self.kl_horizon > 0, "kl_horizon", "positive"),
                  (self.reward_clip is None or self.reward_clip > 0, "reward_clip", "positive or null")]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"ppo.{key} in {source} must be {expected}, got {getattr(self, key)!r}.")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ConfigError(f"ppo.kl_target is set in {source} but ppo.kl_coef is 0: the adaptive controller "
                              "scales beta and cannot move it from 0.", hint="Start it at e.g. ppo.kl_coef=0.05.")


@dataclass
class Config(RecipeConfig):
    rollout: RolloutConfig = online.rollout_section(1, "vLLM sampling and engine settings (rollout.n samples per prompt).")
    ppo: PPOSettings = field(default_factory=PPOSettings, metadata={"help": "PPO settings."})

    def validate(self, source: str) -> None:
        super().validate(source)
        self.ppo.truncated.check_window(self.rollout.max_tokens, source)


def batch_plan(cfg: Config, world_size: int, source: str) -> dict[str, int]:
    """The batch arithmetic (shared with GRPO), checked up front."""
    return online.batch_plan(cfg.ppo, n=cfg.rollout.n, epochs=cfg.ppo.epochs, train=cfg.train,
                             world_size=world_size, source=source)


def check_critic_source(cfg: Config) -> None:
    """A reward model to start the critic from must be a 1-label sequence-classification checkpoint."""
    critic = cfg.ppo.critic
    if critic.init != "reward_model":
        return
    check_model_path(critic.path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(critic.path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"could not read ppo.critic.path {critic.path!r}: {err}") from None
    kinds = getattr(config, "architectures", None) or []
    if config.num_labels != 1 or not any(k.endswith("ForSequenceClassification") for k in kinds):
        raise UserError(f"ppo.critic.path {critic.path!r} is not a reward model: expected a sequence-classification "
                        f"model with 1 label (as the rm trainer saves), found {kinds or 'no architecture'} with "
                        f"{config.num_labels} labels.")


def preflight(cfg: Config, world_size: int, source: str) -> str:
    check_critic_source(cfg)
    learners = cfg.rollout.learner_ranks(world_size, source)  # disaggregated: the rollout ranks do not train
    check_layout(cfg.rollout, cfg.rollout.model or cfg.model.path, world_size, source)
    return online.preflight(cfg, cfg.ppo, batch_plan(cfg, learners, source))


def load_critic(cfg: Config, pad_token_id: int | None) -> torch.nn.Module:
    """The value model: ``AutoModelForTokenClassification`` with one label and no dropout.

    From the policy checkpoint the value head is new and starts at zero, so every first value is 0 --
    the mean of normalised scores -- rather than noise that would steer the first policy updates. From a
    reward model (``AutoModelForSequenceClassification``, 1 label, ``score`` without bias) the backbone and
    the ``score`` head load unchanged, and the head is applied at every position instead of the last.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    critic = cfg.ppo.critic
    path = cfg.model.path if critic.init == "policy" else critic.path
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    config.num_labels = 1
    config.classifier_dropout = 0.0  # old and new values must come from the same function
    if critic.init == "reward_model":
        config.token_classification_bias = False  # the reward model's score head has none
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    try:
        model = AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=dtype,
                                                                trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load {path!r} as a value model: {err}") from None
    if critic.init == "policy":
        with torch.no_grad():
            model.score.weight.zero_()
            if model.score.bias is not None:
                model.score.bias.zero_()
    model.config.pad_token_id = pad_token_id
    model.config.architectures = [type(model).__name__]
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def token_values(logits: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """V_t for each completion token t, ``[B, L]`` in ``token_logprobs``' layout: the value head's output at
    position t - 1, the state token t was sampled from; 0 outside the completion."""
    v = logits[..., 0].float()
    shifted = torch.cat([v.new_zeros(v.shape[0], 1), v[:, :-1]], dim=1)
    return torch.where(completion_mask.bool(), shifted, torch.zeros_like(shifted))


def final_state_values(logits: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """V(s_T) per row, ``[B]``: the value head's output at the last completion token, i.e. the value of the
    state after the whole (possibly cut) response -- the bootstrap of extended GAE (T-PPO). 0 for a row with no
    completion token. ``completion_mask`` marks a contiguous run of tokens per row (right-padded batches)."""
    v = logits[..., 0].float()
    on = completion_mask.bool()
    positions = torch.arange(on.shape[1], device=on.device).expand_as(on)
    last = torch.where(on, positions, torch.full_like(positions, -1)).max(dim=1).values
    picked = v.gather(1, last.clamp(min=0)[:, None])[:, 0]
    return torch.where(last >= 0, picked, torch.zeros_like(picked))


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
        self.critic = self._setup_critic()
        self.reference = self._setup_reference()
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

    def _setup_critic(self):
        cfg = self.cfg
        model = load_critic(cfg, self.tokenizer.pad_token_id)
        return build_learner(model, dataclasses.replace(cfg.learner, lr=cfg.ppo.critic.lr),
                             world_size=self.dist.world_size, micro_batch_size=cfg.train.micro_batch_size,
                             grad_accum=self.plan["grad_accum"], total_steps=self.plan["optimizer_steps"])

    def _setup_reference(self) -> FrozenReference | None:
        return None if self.cfg.ppo.kl_coef == 0 else build_reference(self.cfg, self.learner)

    def train(self) -> dict:
        return train_loop(self.cfg, self.dist, self.run, self.total_steps, self.rl_step, self.rollouts.evaluate,
                          self.save,
                          [["reward/mean", "eval/reward"], ["accuracy", "eval/accuracy"], ["kl"], ["kl_coef"],
                           ["policy_loss"], ["value_loss"], ["explained_variance"], ["entropy"],
                           ["clipfrac", "vf_clipfrac"], ["time/samples_per_s"]],
                          progress_keys=("reward/mean", "time/samples_per_s"))

    def cleanup(self) -> None:
        if getattr(self, "rollouts", None) is not None:
            self.rollouts.close()

    def save(self, step: int) -> None:
        state = {"total_steps": self.total_steps, "kl_controller": self.kl_controller.state_dict(),
                 "reward_stats": self.reward_stats.state_dict()}
        self.run.save(step, self.learner, self.tokenizer, state=state, extra={"critic": self.critic})

    def rl_step(self, step: int) -> dict:
        cfg, p = self.cfg, self.cfg.ppo
        temperature = max(cfg.rollout.temperature, 1e-6)
        timer = StageTimer()
        rows, batch, scores, raw_scores = self.rollouts.sample(step, timer)

        train_started = time.perf_counter()
        tensors = batch.collate(self.tokenizer.pad_token_id)
        mask = tensors["completion_mask"].float()
        incomplete = self._incomplete(batch)  # T-PPO: the responses its window cut (all False when it is off)
        # A sample no reward scored carries no signal: it is left out of the losses (counted in reward/unscored).
        # An incomplete response needs no score: T-PPO bootstraps it from the critic.
        loss_mask = mask * (torch.isfinite(scores) | incomplete)[:, None].float()
        keep = torch.ones(len(batch), dtype=torch.bool)
        if p.pf_ppo != "off":  # PF-PPO: only the most reliably rewarded samples of each prompt train
            keep = online.policy_filtration_keep(p.pf_ppo, scores, cfg.rollout.n, seed=cfg.seed, step=step,
                                                  rank=self.dist.rank)
            loss_mask = loss_mask * keep[:, None].float()
        old_logprobs, ref_logprobs = online.old_and_ref_logprobs(self.learner, self.reference, tensors,
                                                                 cfg.train.micro_batch_size, temperature,
                                                                 padding_free=p.padding_free)
        old_values, final_values = self._values(tensors)
        beta = self.kl_controller.value
        # T-PPO: the outcome reward exists only at completion; an incomplete response gets none (nor counts in the
        # running statistics): its last token's reward is the KL penalty alone, its return bootstrapped.
        shaped = self._shape_scores(scores.masked_fill(incomplete, float("nan")))
        ref = ref_logprobs if ref_logprobs is not None else old_logprobs  # no reference: no penalty
        token_kl = algorithms.kl_estimate(p.kl_estimator, old_logprobs, ref)
        token_rewards = algorithms.kl_penalized_rewards(shaped, old_logprobs, ref, loss_mask, coef=beta,
                                                        kind=p.kl_estimator)
        advantages, returns, value_mask = self._advantages(token_rewards, old_values, final_values, loss_mask,
                                                           incomplete)
        adv_stats = online.global_moments(advantages, loss_mask)
        whitened = (algorithms.masked_whiten(advantages, loss_mask, mean=adv_stats["mean"], var=adv_stats["var"])
                    if p.whiten_advantages else advantages)
        drift = drift_stats(tensors["sampler_logprobs"], old_logprobs, mask)
        weights = None
        if p.rollout_correction.enabled:
            weights, tis_metrics = p.rollout_correction.weights(old_logprobs, tensors["sampler_logprobs"], loss_mask)
            drift.update(tis_metrics)
        if p.save_batches:
            self._save_batch(step, {"scores": scores, "shaped_scores": shaped, "loss_mask": loss_mask,
                                    "logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "token_kl": token_kl,
                                    "values": old_values, "token_rewards": token_rewards, "advantages": advantages,
                                    "whitened_advantages": whitened, "returns": returns, "kl_coef": beta,
                                    "gamma": p.gamma, "lam": p.lam, "input_ids": tensors["input_ids"],
                                    "truncated": incomplete, "final_values": final_values, "value_mask": value_mask,
                                    "value_lam": self._value_lam()})
        update = self._update(step, tensors, old_logprobs, old_values, whitened, returns, loss_mask, weights,
                              value_mask=value_mask)
        timer.add("train", time.perf_counter() - train_started)
        metrics = self.rollouts.finish_step(self.learner, timer, batch, scores, raw_scores, drift, keep)
        seq_kl = algorithms.masked_sum(token_kl, loss_mask, dim=-1)
        scored = loss_mask.sum(-1) > 0
        kl_sum, shaped_sum, seqs = all_reduce_sum([float(seq_kl[scored].sum()), float(shaped[scored].sum()),
                                                   float(scored.sum())])
        kl = kl_sum / max(seqs, 1.0)
        returns_stats = online.global_moments(returns, value_mask)  # the critic's targets, where it trains
        residual = online.global_moments(returns - old_values, value_mask)
        value_stats = online.global_moments(old_values, loss_mask)
        metrics.update({
            "kl": kl, "kl_coef": beta, "reward/shaped_mean": shaped_sum / max(seqs, 1.0),
            "reward/running_mean": self.reward_stats.mean, "reward/running_std": self.reward_stats.std,
            "advantages/mean": adv_stats["mean"], "advantages/std": adv_stats["var"] ** 0.5,
            "advantages/min": adv_stats["min"], "advantages/max": adv_stats["max"],
            "returns/mean": returns_stats["mean"], "values/mean": value_stats["mean"],
            # 1 - Var(R - V) / Var(R): the share of the returns' variance the critic explains (1 is perfect)
            "explained_variance": 1.0 - residual["var"] / max(returns_stats["var"], 1e-12),
            **update, "lr": self.learner.lr, "critic_lr": self.critic.lr,
        })
        if self.learner.grad_norm is not None:
            metrics["grad_norm"] = self.learner.grad_norm
        if self.critic.grad_norm is not None:
            metrics["critic_grad_norm"] = self.critic.grad_norm
        if p.truncated.enabled:
            metrics.update(self._truncation_metrics(scores, incomplete, final_values, loss_mask, value_mask))
        if p.kl_target is not None:
            self.kl_controller.update(kl, n_steps=int(seqs))
        return metrics

    @torch.no_grad()
    def _values(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The critic's values before this step's updates: V_old ``[B, L]``, and V(s_T) ``[B]``, the value of the
        state after each whole response (T-PPO's bootstrap), from the same forward passes."""
        size = self.cfg.train.micro_batch_size
        out, final = [], []
        self.critic.eval()
        for start in range(0, tensors["input_ids"].shape[0], size):
            part = {k: v[start : start + size] for k, v in tensors.items()}
            logits = forward_logits(self.critic, part["input_ids"], part["attention_mask"],
                                         padding_free=self.cfg.ppo.padding_free)
            out.append(token_values(logits, part["completion_mask"]))
            final.append(final_state_values(logits, part["completion_mask"]))
        self.critic.train()
        return torch.cat(out), torch.cat(final)

    def _incomplete(self, batch) -> torch.Tensor:
        """``[B]`` bool: with T-PPO on, the responses the generation window cut (finish_reason "length"); all False
        otherwise."""
        enabled = self.cfg.ppo.truncated.enabled
        return torch.tensor([enabled and s.finish_reason == "length" for s in batch], dtype=torch.bool)

    def _value_lam(self) -> float:
        """Lambda of the critic's targets: T-PPO's ``truncated.value_lam`` (null: ``ppo.lam``), else ``ppo.lam``."""
        p = self.cfg.ppo
        return p.truncated.value_lam if p.truncated.enabled and p.truncated.value_lam is not None else p.lam

    def _advantages(self, token_rewards: torch.Tensor, values: torch.Tensor, final_values: torch.Tensor,
                    loss_mask: torch.Tensor, incomplete: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(advantages, the critic's targets, the value loss's mask), ``[B, L]`` each.

        PPO: GAE, returns R_t = A_t + V_t, the value loss on every loss token. T-PPO: extended GAE (the incomplete
        rows bootstrapped from ``final_values``, V(s_T)); the value loss only on finished responses (an incomplete
        one's return would rest on the critic's own guess of V(s_T)), towards their lambda-``value_lam`` returns
        (GAE's, as EGAE equals GAE on finished rows); targets are 0 on the incomplete rows."""
        p = self.cfg.ppo
        if not p.truncated.enabled:
            advantages, returns = algorithms.gae_advantages(token_rewards, values, loss_mask, gamma=p.gamma, lam=p.lam)
            return advantages, returns, loss_mask
        advantages, returns = algorithms.egae_advantages(token_rewards, values, loss_mask, truncated=incomplete,
                                                         bootstrap_values=final_values, gamma=p.gamma, lam=p.lam)
        value_mask = loss_mask * (~incomplete)[:, None].float()
        if self._value_lam() != p.lam:
            _, returns = algorithms.gae_advantages(token_rewards, values, value_mask, gamma=p.gamma,
                                                   lam=self._value_lam())
        return advantages, returns * value_mask, value_mask

    def _truncation_metrics(self, scores: torch.Tensor, incomplete: torch.Tensor, final_values: torch.Tensor,
                            loss_mask: torch.Tensor, value_mask: torch.Tensor) -> dict[str, float]:
        """T-PPO's step metrics over every rank: the share of incomplete responses, the critic's mean V(s_T) on
        them, the share of loss tokens the value loss trains on, and the mean score of the finished responses."""
        finished = ~incomplete & torch.isfinite(scores)
        (cut, count, boot, loss_tokens, value_tokens, done, done_sum) = all_reduce_sum([
            float(incomplete.sum()), float(incomplete.numel()), float(final_values[incomplete].sum()),
            float(loss_mask.sum()), float(value_mask.sum()), float(finished.sum()), float(scores[finished].sum())])
        return {"tppo/window": float(self.rollouts.max_tokens), "tppo/incomplete_share": cut / max(count, 1.0),
                "tppo/bootstrap_value_mean": boot / max(cut, 1.0),
                "tppo/value_token_share": value_tokens / max(loss_tokens, 1.0),
                "tppo/finished_reward_mean": done_sum / max(done, 1.0)}

    def _shape_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores normalised by the running statistics (updated with this step's, over all ranks) and clipped;
        unscored samples get 0 (they are masked out of the losses)."""
        p = self.cfg.ppo
        shaped = scores.double()
        if p.reward_norm:
            finite = shaped[torch.isfinite(shaped)]
            self.reward_stats.update_from_sums(*all_reduce_sum([float(finite.numel()), float(finite.sum()),
                                                                float((finite * finite).sum())]))
            shaped = algorithms.normalize_rewards(shaped, mean=self.reward_stats.mean, std=self.reward_stats.std,
                                                  clip=p.reward_clip)
        elif p.reward_clip is not None:
            shaped = shaped.clamp(-p.reward_clip, p.reward_clip)
        return shaped.float().nan_to_num(0.0)

    def _update(self, step: int, tensors, old_logprobs, old_values, advantages, returns, loss_mask,
                weights=None, value_mask=None) -> dict[str, float]:
        """``ppo.epochs`` passes of shuffled mini-batches; each mini-batch is one optimizer step of the policy
        and one of the critic. Losses are aggregated over the global mini-batch (counts summed over ranks).
        ``value_mask`` (default ``loss_mask``): the tokens of the value loss (T-PPO: finished responses only); a
        mini-batch with none on any rank leaves the critic untouched."""
        value_mask = loss_mask if value_mask is None else value_mask
        cfg, p, dist = self.cfg, self.cfg.ppo, self.dist
        temperature = max(cfg.rollout.temperature, 1e-6)
        train_policy = step >= p.critic.pretrain_steps
        divisor = self.plan["grad_accum"] * dist.world_size
        sums: dict[str, float] = defaultdict(float)
        updates = critic_updates = 0

        def shuffle_seed(epoch: int) -> int:  # (run, step, epoch, rank) alone: a resumed run shuffles alike
            return cfg.seed * 1_000_003 + step * 1009 + epoch * 101 + dist.rank

        for _epoch, rows in online.mini_batches(tensors["input_ids"].shape[0], self.plan["mini_batches"], p.epochs,
                                                shuffle_seed):
            agg, _ = online.loss_aggregation(loss_mask[rows], norm_constant=float(cfg.rollout.max_tokens),
                                             gradient_divisor=divisor)
            value_agg, value_tokens = online.loss_aggregation(
                value_mask[rows], norm_constant=float(cfg.rollout.max_tokens), gradient_divisor=divisor)
            for part in online.micro_batches(rows, cfg.train.micro_batch_size):
                ids, attention = tensors["input_ids"][part], tensors["attention_mask"][part]
                completion, mask = tensors["completion_mask"][part], loss_mask[part]
                tokens = mask.sum().item()
                if train_policy:
                    self._policy_micro_step(step, ids, attention, completion, mask, old_logprobs[part],
                                            advantages[part], agg, temperature, sums, divisor, tokens,
                                            None if weights is None else weights[part])
                sums["tokens"] += tokens
                if value_tokens == 0:  # decided alike on every rank: no collective is left waiting
                    continue
                vmask = value_mask[part]
                values = token_values(forward_logits(self.critic, ids, attention,
                                                          padding_free=p.padding_free), completion)
                value_loss, metrics = algorithms.value_loss(values, old_values[part], returns[part], vmask,
                                                            clip_range=p.value_clip, loss_agg_mode=p.loss_agg,
                                                            **value_agg)
                value_loss, skipped = online.guard_nonfinite(value_loss, p.nonfinite_loss, "value loss",
                                                             "ppo.nonfinite_loss", step=step + 1,
                                                             last_checkpoint=self.run.last_checkpoint,
                                                             anchor=values)
                self.critic.backward(value_loss)
                self.critic.step()
                if not skipped:
                    sums["value_loss"] += value_loss.item() / divisor
                sums["nonfinite_skipped"] += float(skipped) / self.dist.world_size  # all ranks skip together
                sums["vf_clipfrac"] += float(metrics.get("vf_clipfrac", 0.0)) * vmask.sum().item()
                sums["value_tokens"] += vmask.sum().item()
            updates += 1
            critic_updates += value_tokens > 0
        keys = sorted(sums)
        out = dict(zip(keys, all_reduce_sum([sums[k] for k in keys])))
        tokens = max(out.pop("tokens", 0.0), 1.0)
        value_tokens = max(out.pop("value_tokens", 0.0), 1.0)
        result = {"policy_loss": out.get("policy_loss", 0.0) / max(updates, 1),
                  "value_loss": out.get("value_loss", 0.0) / max(critic_updates, 1),
                  "nonfinite_skipped": out.get("nonfinite_skipped", 0.0),
                  "vf_clipfrac": out.get("vf_clipfrac", 0.0) / value_tokens}
        if train_policy:
            result.update({k: out.get(k, 0.0) / tokens for k in ("clipfrac", "approx_kl", "entropy")})
        return result

    def _policy_micro_step(self, step: int, ids, attention, completion, mask, old_logprobs, advantages, agg, temperature,
                           sums, divisor, tokens, weights=None) -> None:
        p = self.cfg.ppo
        logits = forward_logits(self.learner, ids, attention, padding_free=p.padding_free)
        logprobs = token_logprobs(logits, ids, completion, temperature=temperature)
        result = algorithms.compute_policy_loss("ppo", logprobs, old_logprobs, advantages, mask,
                                                loss_agg_mode=p.loss_agg, clip_low=p.clip_range,
                                                clip_high=p.clip_range, importance_weights=weights, **agg)
        loss = result.loss
        if p.entropy_coef:
            entropy = token_entropy(logits, completion, temperature=temperature)
            loss = loss + algorithms.entropy_bonus(entropy, mask, coef=p.entropy_coef, loss_agg_mode=p.loss_agg, **agg)
        else:
            with torch.no_grad():
                entropy = token_entropy(logits.detach(), completion, temperature=temperature)
        loss, skipped = online.guard_nonfinite(loss, p.nonfinite_loss, "policy loss", "ppo.nonfinite_loss",
                                               step=step + 1, last_checkpoint=self.run.last_checkpoint,
                                               anchor=logits)
        self.learner.backward(loss)
        self.learner.step()
        if not skipped:
            sums["policy_loss"] += result.loss.item() / divisor
        sums["nonfinite_skipped"] += float(skipped) / self.dist.world_size
        # metrics are means over this micro-batch's loss tokens: weight them back to sums
        sums["clipfrac"] += float(result.metrics["clipfrac"]) * tokens
        sums["approx_kl"] += float(result.metrics["approx_kl"]) * tokens
        sums["entropy"] += float(algorithms.masked_sum(entropy.detach(), mask))

    def _save_batch(self, step: int, tensors: dict) -> None:
        directory = Path(self.cfg.output_dir) / "batches"
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, directory / f"step-{step + 1:06d}-rank-{self.dist.rank}.pt")
