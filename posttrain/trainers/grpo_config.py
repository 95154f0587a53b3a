"""GRPO's settings (``grpo:``), the checks of their names and options against the algorithm registries, and the
batch arithmetic and preflight of a GRPO run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from posttrain import algorithms
from posttrain.config.schema import ConfigError, doc
from posttrain.rollout import RolloutConfig
from posttrain.rollout.layout import check_layout
from posttrain.trainers import online
from posttrain.trainers.common import RecipeConfig
from posttrain.trainers.hapo import HAPOSettings
from posttrain.trainers.online import OnlineSettings, RolloutCorrection


@dataclass
class GRPOSettings(OnlineSettings):
    section: ClassVar[str] = "grpo"

    epochs: int = doc(1, "Optimisation passes over each rollout batch.")
    estimator: str = doc("grpo", "Advantage estimator (see docs/algorithms.md): per sequence grpo, dr_grpo, rloo, bnpo, ...; or per token reinforce_pp (REINFORCE++: returns of the token rewards, whitened over the step's batch) or discounted_returns (the reward placed on the last token, minus the per-token KL with kl_in: reward).")
    estimator_args: dict = doc({}, "Options of the estimator, e.g. {scale: batch} for GRPO.")
    policy_loss: str = doc("ppo", "Policy loss: ppo, gspo, cispo, clip_cov, kl_cov.")
    policy_loss_args: dict = doc({}, "Options of the policy loss (clip_low, clip_high, dual_clip, ...); unset ones take the loss's own defaults from its paper (ppo: 0.2 / 0.2, gspo: 3e-4 / 4e-4, cispo: clip_high 4).")
    loss_agg: str = doc("token-mean", "Loss aggregation: token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm.")
    kl_coef: float = doc(0.0, "Weight of the KL to the reference policy (0: no reference model is loaded).")
    kl_estimator: str = doc("k3", "KL estimator: k1, k2, k3, low_var_kl.")
    kl_in: Literal["loss", "reward"] = doc("loss", "Put the KL penalty in the loss (GRPO) or subtract it from the reward.")
    entropy_coef: float = doc(0.0, "Entropy bonus weight.")
    dynamic_sampling: bool = doc(False, "DAPO dynamic sampling: groups whose rewards are all equal carry no signal; sample more groups until the step holds prompts_per_step informative ones (docs/rl.md).")
    dynamic_sampling_max_rounds: int = doc(3, "Extra sampling rounds (prompts_per_step fresh prompts each) a step may spend to find informative groups; a step still short is filled with uninformative groups, masked out of the loss and counted. 0: only mask.")
    tis_cap: float | None = doc(None, "Short for rollout_correction: {level: token, mode: truncate, clip_max: tis_cap}: weight tokens by min(pi_learner/pi_sampler, cap).")
    hapo: HAPOSettings = doc(HAPOSettings, "HAPO: add a history-aware length reward, {enabled: true, weight: 1.0} (docs/rl.md).")

    def correction(self) -> RolloutCorrection:
        """The rollout correction in force: ``rollout_correction``, or the one ``tis_cap`` stands for."""
        if self.tis_cap is not None:
            return RolloutCorrection(level="token", mode="truncate", clip_max=self.tis_cap)
        return self.rollout_correction

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.tis_cap is not None and self.rollout_correction.enabled:
            raise ConfigError(f"grpo.tis_cap and grpo.rollout_correction in {source} both set a correction; "
                              "tis_cap is the short form of rollout_correction: {level: token, mode: truncate, "
                              "clip_max: CAP}. Keep one.")
        self.correction().check("grpo.tis_cap", source)
        self.hapo.check("grpo.hapo", source)
        if self.token_level:
            if "values" in algorithms.TOKEN_ADVANTAGE_ESTIMATORS.needs(self.estimator):
                raise ConfigError(f"grpo.estimator: {self.estimator} in {source} needs a critic's values, which GRPO "
                                  "does not train.", hint="Use trainer: ppo: recipes/ppo.yaml for gae, recipes/tppo.yaml (ppo.truncated) for egae.")
            check_options(algorithms.TOKEN_ADVANTAGE_ESTIMATORS, self.estimator, self.estimator_args,
                          "grpo.estimator_args", source, supplied=("token_rewards", "mask", "mean", "var"))
            estimators = algorithms.TOKEN_ADVANTAGE_ESTIMATORS
        else:
            estimators = algorithms.ADVANTAGE_ESTIMATORS
        for registry, name, key in ((estimators, self.estimator, "estimator"),
                                    (algorithms.POLICY_LOSSES, self.policy_loss, "policy_loss"),
                                    (algorithms.LOSS_AGGREGATIONS, self.loss_agg, "loss_agg"),
                                    (algorithms.KL_ESTIMATORS, self.kl_estimator, "kl_estimator")):
            if name not in registry:
                raise ConfigError(f"grpo.{key} in {source}: {registry.unknown_message(name)}")
        check_options(algorithms.POLICY_LOSSES, self.policy_loss, self.policy_loss_args, "grpo.policy_loss_args",
                      source, supplied=("logprobs", "old_logprobs", "advantages", "mask", "loss_agg_mode",
                                        "importance_weights", "global_num_tokens", "global_num_seqs",
                                        "norm_constant", "gradient_divisor"))
        if not self.token_level:
            check_options(algorithms.ADVANTAGE_ESTIMATORS, self.estimator, self.estimator_args,
                          "grpo.estimator_args", source, supplied=("rewards", "group_size"))

    @property
    def token_level(self) -> bool:
        """Whether ``estimator`` names a token-level estimator (advantages [B, T]) rather than a sequence one."""
        return self.estimator in algorithms.TOKEN_ADVANTAGE_ESTIMATORS

    def estimator_needs(self) -> frozenset[str]:
        registry = algorithms.TOKEN_ADVANTAGE_ESTIMATORS if self.token_level else algorithms.ADVANTAGE_ESTIMATORS
        return registry.needs(self.estimator)


def check_options(registry, name: str, options: dict, key: str, source: str, *, supplied: tuple[str, ...]) -> None:
    """Reject options the function registered as ``name`` does not take, or ones the trainer supplies itself."""
    import inspect

    parameters = inspect.signature(registry.get(name)).parameters
    own = {p for p, v in parameters.items() if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)}
    taken = set(supplied) | set(registry.needs(name))
    for option in options:
        if option in taken:
            raise ConfigError(f"{key}.{option} in {source}: the trainer supplies {option!r} to {name}; remove it.")
        if option not in own and not any(v.kind is v.VAR_KEYWORD for v in parameters.values()):
            valid = ", ".join(sorted(own - taken)) or "none"
            raise ConfigError(f"{key} in {source}: {name} has no option {option!r}. Its options: {valid}.")


@dataclass
class Config(RecipeConfig):
    rollout: RolloutConfig = online.rollout_section(8, "vLLM sampling and engine settings (rollout.n is the group size).")
    grpo: GRPOSettings = field(default_factory=GRPOSettings, metadata={"help": "GRPO settings."})


def batch_plan(cfg: Config, world_size: int, source: str) -> dict[str, int]:
    """The batch arithmetic, checked up front with a message that says which numbers must divide which."""
    return online.batch_plan(cfg.grpo, n=cfg.rollout.n, epochs=cfg.grpo.epochs, train=cfg.train,
                             world_size=world_size, source=source)


def preflight(cfg: Config, world_size: int, source: str) -> str:
    learners = cfg.rollout.learner_ranks(world_size, source)  # disaggregated: the rollout ranks do not train
    if "baseline_rewards" in cfg.grpo.estimator_needs() \
            and cfg.rollout.schedule != "sync":
        raise ConfigError(f"grpo.estimator: {cfg.grpo.estimator} in {source} needs the greedy completion of the "
                          f"policy that sampled the step, which rollout.schedule: {cfg.rollout.schedule} does not "
                          "have; use rollout.schedule: sync.")
    check_layout(cfg.rollout, cfg.rollout.model or cfg.model.path, world_size, source)
    return online.preflight(cfg, cfg.grpo, batch_plan(cfg, learners, source))
