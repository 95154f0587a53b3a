"""PPO's settings (``ppo:``: the critic, T-PPO's window, PPO-max's shaping), the batch arithmetic and the
preflight of a PPO run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from posttrain import algorithms
from posttrain.config.schema import ConfigError, doc
from posttrain.errors import UserError
from posttrain.models.loading import check_model_path
from posttrain.rollout import RolloutConfig
from posttrain.rollout.layout import check_layout
from posttrain.trainers import online
from posttrain.trainers.common import RecipeConfig
from posttrain.trainers.online import OnlineSettings


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
