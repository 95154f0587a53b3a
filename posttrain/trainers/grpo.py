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
import math
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from posttrain import algorithms
from posttrain.config.schema import ConfigError, doc
from posttrain.distributed import (
    DistInfo,
    all_gather_objects,
    all_gather_rows,
    all_reduce_max,
    all_reduce_sum,
)
from posttrain.learner.packing import forward_logits
from posttrain.models.loading import load_tokenizer
from posttrain.rollout import RolloutConfig, token_entropy, token_logprobs
from posttrain.rollout.layout import check_layout
from posttrain.rollout.logprobs import drift_stats
from posttrain.trainers import online
from posttrain.trainers.common import RecipeConfig, check_output_dir, seed_everything
from posttrain.trainers.hapo import HAPOSettings, HAPOShaping
from posttrain.trainers.harness import RunHarness, run_identity
from posttrain.trainers.loop import train_loop
from posttrain.trainers.online import OnlineRollouts, OnlineSettings, PromptRow, RolloutCorrection
from posttrain.trainers.policy import build_policy, build_reference
from posttrain.trainers.reference import FrozenReference
from posttrain.trainers.timing import StageTimer

log = logging.getLogger("posttrain")


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


@dataclass
class MicroBatchLoss:
    loss: torch.Tensor  # what is back-propagated: policy loss (+ kl_coef * KL) (+ entropy bonus)
    policy: algorithms.PolicyLossResult
    kl: torch.Tensor | None  # the KL term before kl_coef, when it is in the loss
    logits: torch.Tensor
    logprobs: torch.Tensor  # [b, L], token_logprobs' layout


def micro_batch_loss(model, g: GRPOSettings, input_ids, attention_mask, completion_mask, old_logprobs, ref_logprobs,
                     token_advantages, loss_mask, importance_weights, agg: dict, temperature: float) -> MicroBatchLoss:
    """One micro-batch's GRPO loss: the policy loss ``g.policy_loss`` aggregated by ``g.loss_agg`` over the global
    batch (``agg``: global token and sequence counts, the constant of ``seq-mean-token-sum-norm``, the gradient
    divisor), plus ``kl_coef`` times the KL to the reference when ``kl_in: loss``, plus the entropy bonus.
    ``old_logprobs`` None: one pass, the detached log-probs of this forward are the old ones (ratio 1)."""
    logits = forward_logits(model, input_ids, attention_mask, padding_free=g.padding_free)
    logprobs = token_logprobs(logits, input_ids, completion_mask, temperature=temperature)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    policy = algorithms.compute_policy_loss(g.policy_loss, logprobs, old, token_advantages, loss_mask,
                                            loss_agg_mode=g.loss_agg, importance_weights=importance_weights,
                                            **agg, **g.policy_loss_args)
    loss, kl = policy.loss, None
    if g.kl_coef and g.kl_in == "loss":
        kl = algorithms.kl_loss(logprobs, ref_logprobs, loss_mask, kind=g.kl_estimator, loss_agg_mode=g.loss_agg, **agg)
        loss = loss + g.kl_coef * kl
    if g.entropy_coef:
        entropy = token_entropy(logits, completion_mask, temperature=temperature)
        loss = loss + algorithms.entropy_bonus(entropy, loss_mask, coef=g.entropy_coef, loss_agg_mode=g.loss_agg, **agg)
    return MicroBatchLoss(loss, policy, kl, logits, logprobs)


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
        self.reference = self._setup_reference()
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

    def _setup_reference(self) -> FrozenReference | None:
        return None if self.cfg.grpo.kl_coef == 0 else build_reference(self.cfg, self.learner)

    def train(self) -> dict:
        return train_loop(self.cfg, self.dist, self.run, self.total_steps, self.rl_step, self.rollouts.evaluate,
                          self.save,
                          [["reward/mean", "eval/reward"], ["eval/accuracy"], ["kl"], ["entropy"],
                           ["time/samples_per_s"], ["drift/abs_diff_max"], ["completion_tokens"]],
                          progress_keys=("reward/mean", "time/samples_per_s"))

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
        cfg, g = self.cfg, self.cfg.grpo
        n = cfg.rollout.n
        timer = StageTimer()
        rows, batch, rewards, scores = self.rollouts.sample(step, timer)
        refill_metrics: dict[str, float] = {}
        if g.dynamic_sampling and g.dynamic_sampling_max_rounds > 0:
            with timer.stage("generate"):  # the refill rounds' generation and scoring
                rows, batch, rewards, scores, refill_metrics = self._refill(step, rows, batch, rewards, scores)
        hapo_metrics: dict[str, float] = {}
        if self.hapo is not None:  # + weight x the history-aware length reward; then the history takes this step
            rewards, hapo_metrics = self.hapo.shape(rows, batch, rewards, scores)
        task_rewards = rewards
        baseline_rewards = None
        if "baseline_rewards" in g.estimator_needs():  # ReMax: greedy baseline
            with timer.stage("generate"):
                baseline_rewards = self.rollouts.greedy_rewards(rows).repeat_interleave(n)

        train_started = time.perf_counter()
        tensors = batch.collate(self.tokenizer.pad_token_id)
        mask = tensors["completion_mask"].float()
        single_pass = self._single_pass()
        old_logprobs, ref_logprobs = online.old_and_ref_logprobs(self.learner, self.reference, tensors,
                                                                 cfg.train.micro_batch_size,
                                                                 max(cfg.rollout.temperature, 1e-6),
                                                                 need_old=not single_pass,
                                                                 padding_free=g.padding_free)
        reward_kl = None
        if g.kl_coef and g.kl_in == "reward":
            penalty = algorithms.sequence_kl(g.kl_estimator, old_logprobs, ref_logprobs, mask)
            rewards = rewards - g.kl_coef * penalty
            reward_kl = all_reduce_sum([float(penalty.sum()), float(len(penalty))])  # logged as `kl`
        # SPO: the step's prompt keys over every rank, in the one-process order (for its advantages and tracker)
        keys = all_gather_objects(self._keys(rows, n)) if self.spo is not None else None
        if g.token_level:
            advantages = self._token_advantages(task_rewards, old_logprobs, ref_logprobs, mask)
        else:
            advantages = self._advantages(rewards, n, mask, baseline_rewards, keys)
        keep = torch.ones(len(batch), dtype=torch.bool)
        if g.dynamic_sampling:
            keep = algorithms.dynamic_sampling_mask(task_rewards, n)  # before any KL in the reward
        if g.pf_ppo != "off":  # advantages come from the whole group; only the filtered samples train
            keep &= online.policy_filtration_keep(g.pf_ppo, task_rewards, n, seed=cfg.seed, step=step,
                                                  rank=self.dist.rank)
        loss_mask = mask * keep[:, None].float()
        weights, tis_metrics = None, {}
        if g.correction().enabled:
            weights, tis_metrics = g.correction().weights(old_logprobs, tensors["sampler_logprobs"], mask)
        update = self._update(step, tensors, old_logprobs, ref_logprobs, advantages, loss_mask, weights)
        learner_logprobs = old_logprobs if old_logprobs is not None else update.pop("first_logprobs")
        drift = {**drift_stats(tensors["sampler_logprobs"], learner_logprobs, mask), **tis_metrics}
        spo_metrics = self._update_tracker(keys, task_rewards, tensors, learner_logprobs, mask)
        timer.add("train", time.perf_counter() - train_started)
        metrics = self.rollouts.finish_step(self.learner, timer, batch, rewards, scores, drift, keep)
        kl = update["kl"] if reward_kl is None else reward_kl[0] / max(reward_kl[1], 1.0)
        metrics.update({"loss": update["loss"], "kl": kl,
                        "clipfrac": update["clipfrac"], "nonfinite_skipped": update["nonfinite"],
                        "lr": self.learner.lr, **spo_metrics, **refill_metrics, **hapo_metrics})
        if baseline_rewards is not None:
            finite = baseline_rewards[torch.isfinite(baseline_rewards)]
            total, scored = all_reduce_sum([float(finite.sum()), float(finite.numel())])
            metrics["remax/baseline_reward"] = total / max(scored, 1.0)
        if self.learner.grad_norm is not None:
            metrics["grad_norm"] = self.learner.grad_norm
        return metrics

    def _refill(self, step: int, rows, batch, rewards, scores):
        """DAPO dynamic sampling: more groups until the step holds prompts_per_step informative ones."""
        from posttrain.trainers import dynamic_sampling as ds

        def more_round(round_: int) -> list[ds.ScoredGroup]:
            extra_rows = self.rollouts.refill_rows(step, round_)
            extra = self.rollouts.generate_refill(step, round_, extra_rows)
            extra_rewards, extra_scores = self.rollouts.score(extra_rows, extra)
            return ds.split_groups(extra_rows, extra, extra_rewards, extra_scores)

        mine, metrics = ds.fill_with_informative_groups(
            ds.split_groups(rows, batch, rewards, scores), more_round, target=self.cfg.grpo.prompts_per_step,
            max_rounds=self.cfg.grpo.dynamic_sampling_max_rounds, rank=self.dist.rank,
            world_size=self.dist.world_size)
        return (*ds.join_groups(mine, batch), metrics)

    def _single_pass(self) -> bool:
        """Whether the update's own forward can stand in for the "old" log-probs forward.

        With one epoch and one mini-batch, every micro-batch's forward runs on the weights that sampled (the
        optimizer steps once, after the last one), so its detached log-probs *are* the old log-probs: the
        ratio is exactly 1 and the gradient is the same, one forward fewer per step (TRL does the same).
        Truncated importance sampling and a KL penalty in the reward need the old log-probs before the
        update, so they keep the separate forward; so does one-step async, where the old log-probs are the
        current learner's (the proximal policy) and must exist before the update, apart from the stale
        sampler's.
        """
        g = self.cfg.grpo
        return (g.epochs == 1 and self.plan["mini_batches"] == 1 and not g.correction().enabled
                and not (g.kl_coef and g.kl_in == "reward") and self.cfg.rollout.schedule == "sync")

    def _advantages(self, rewards: torch.Tensor, n: int, mask: torch.Tensor, baseline_rewards: torch.Tensor | None,
                    keys: list[str] | None) -> torch.Tensor:
        """This rank's advantages, computed on the step's whole batch gathered from every rank (in rank order,
        the one-process order), so batch statistics (scale: batch, REINFORCE++-baseline, BNPO, SPO) are those
        of one process; then this rank's rows."""
        g = self.cfg.grpo
        needs = algorithms.ADVANTAGE_ESTIMATORS.needs(g.estimator)
        kwargs = dict(g.estimator_args)
        if "mask" in needs:  # token-weighted batch statistics: only the response lengths matter
            lengths = all_gather_rows(mask.sum(-1))
            kwargs["mask"] = torch.arange(int(lengths.max().item()) + 1)[None, :] < lengths[:, None]
        if "baseline_rewards" in needs:
            kwargs["baseline_rewards"] = all_gather_rows(baseline_rewards)
        if "tracker" in needs:
            kwargs.update(tracker=self.spo, keys=keys)
        advantages = algorithms.group_advantages(g.estimator, all_gather_rows(rewards), n, **kwargs)
        first = self.dist.rank * rewards.shape[0]
        return advantages[first : first + rewards.shape[0]]

    def _token_advantages(self, rewards: torch.Tensor, old_logprobs, ref_logprobs, mask: torch.Tensor) -> torch.Tensor:
        """Token-level advantages [B, T] (``TOKEN_ADVANTAGE_ESTIMATORS``): the sequence reward on the last
        completion token, minus kl_coef x the per-token KL with ``kl_in: reward`` (as REINFORCE++ and PPO place
        it), through the estimator; batch statistics (REINFORCE++'s whitening) are those of the step's batch over
        every rank. Unscored samples get no advantage."""
        g = self.cfg.grpo
        scored = mask * torch.isfinite(rewards)[:, None].float()
        outcome = torch.nan_to_num(rewards, nan=0.0)
        if g.kl_coef and g.kl_in == "reward":
            token_rewards = algorithms.kl_penalized_rewards(outcome, old_logprobs, ref_logprobs, scored,
                                                            coef=g.kl_coef, kind=g.kl_estimator)
        else:
            zeros = torch.zeros_like(mask)
            token_rewards = algorithms.kl_penalized_rewards(outcome, zeros, zeros, scored, coef=0.0)
        kwargs = dict(g.estimator_args)
        if "batch_stats" in g.estimator_needs():  # whiten with the statistics of the whole step
            returns = algorithms.discounted_returns(token_rewards, scored, gamma=kwargs.get("gamma", 1.0))
            stats = online.global_moments(returns, scored)
            kwargs.update(mean=stats["mean"], var=stats["var"])
        out = algorithms.TOKEN_ADVANTAGE_ESTIMATORS.get(g.estimator)(token_rewards, scored, **kwargs)
        advantages = out[0] if isinstance(out, tuple) else out
        return advantages * scored

    @staticmethod
    def _keys(rows: list[PromptRow], n: int) -> list[str]:
        return [r.where for r in rows for _ in range(n)]

    def _update_tracker(self, keys: list[str] | None, rewards: torch.Tensor, tensors, before: torch.Tensor,
                        mask: torch.Tensor) -> dict[str, float]:
        """SPO: fold the step's rewards into the value tracker, identically on every rank (the gathered batch),
        discounted by how far the policy moved since each prompt was last seen; then record this step's
        movement, measured on its batch after the update."""
        if self.spo is None:
            return {}
        all_rewards = all_gather_rows(rewards)
        scored = [i for i, r in enumerate(all_rewards.tolist()) if math.isfinite(r)]
        before_values = self.spo.values([keys[i] for i in scored])
        self.spo.update([keys[i] for i in scored], all_rewards[scored],
                        divergence=self.spo.divergence([keys[i] for i in scored]))
        after, _ = online.old_and_ref_logprobs(self.learner, None, tensors, self.cfg.train.micro_batch_size,
                                               max(self.cfg.rollout.temperature, 1e-6), need_old=True,
                                               padding_free=self.cfg.grpo.padding_free)
        moved = algorithms.policy_divergence(after, before, mask) * mask.sum(-1)
        moved_sum, tokens = all_reduce_sum([float(moved.sum()), float(mask.sum())])
        self.spo.advance(moved_sum / max(tokens, 1.0))
        after_values = self.spo.values([keys[i] for i in scored])
        checksum = sum(self.spo.alpha.values()) + sum(self.spo.beta.values()) + self.spo.movement
        high, neg_low = all_reduce_max([checksum, -checksum])
        return {"spo/tracked_prompts": float(len(self.spo)), "spo/movement": self.spo.movement,
                "spo/rank_spread": high + neg_low,  # 0: every rank holds the same tracker
                "spo/value_mean": float(after_values.mean()) if scored else 0.0,
                "spo/value_change": float((after_values - before_values).abs().mean()) if scored else 0.0}

    def _update(self, step: int, tensors, old_logprobs, ref_logprobs, advantages, loss_mask,
                weights) -> dict[str, float]:
        cfg, g, dist = self.cfg, self.cfg.grpo, self.dist
        temperature = max(cfg.rollout.temperature, 1e-6)
        divisor = self.plan["grad_accum"] * dist.world_size
        token_adv = (advantages if advantages.dim() == 2 else advantages[:, None].expand_as(loss_mask)).nan_to_num(0.0)
        sums = {"loss": 0.0, "kl": 0.0, "clipfrac": 0.0, "clip_tokens": 0.0, "nonfinite": 0.0}
        updates = 0
        # single pass: the update's own log-probs stand in for the old ones (and give the drift metrics)
        first_logprobs = torch.zeros_like(loss_mask) if old_logprobs is None else None
        for _epoch, rows in online.mini_batches(tensors["input_ids"].shape[0], self.plan["mini_batches"], g.epochs):
            agg, _ = online.loss_aggregation(loss_mask[rows], norm_constant=float(cfg.rollout.max_tokens),
                                             gradient_divisor=divisor)
            for part in online.micro_batches(rows, cfg.train.micro_batch_size):
                out = micro_batch_loss(
                    self.learner, g, tensors["input_ids"][part], tensors["attention_mask"][part],
                    tensors["completion_mask"][part], None if old_logprobs is None else old_logprobs[part],
                    None if ref_logprobs is None else ref_logprobs[part], token_adv[part], loss_mask[part],
                    None if weights is None else weights[part], agg, temperature)
                if old_logprobs is None:  # one epoch: this is the first and only pass
                    first_logprobs[part] = out.logprobs.detach()
                result = out.policy
                if out.kl is not None:
                    sums["kl"] += out.kl.item() / divisor
                loss, skipped = online.guard_nonfinite(out.loss, g.nonfinite_loss, "policy loss",
                                                       "grpo.nonfinite_loss", step=step + 1,
                                                       last_checkpoint=self.run.last_checkpoint, anchor=out.logits)
                sums["nonfinite"] += float(skipped) / dist.world_size  # all ranks skip together
                self.learner.backward(loss)
                self.learner.step()
                if not skipped:
                    sums["loss"] += result.loss.item() / divisor
                # metrics are means over this micro-batch's loss tokens: weight them back to sums
                sums["clipfrac"] += float(result.metrics.get("clipfrac", 0.0)) * loss_mask[part].sum().item()
                sums["clip_tokens"] += loss_mask[part].sum().item()
            updates += 1
        total = all_reduce_sum([sums[k] for k in sorted(sums)])
        out = dict(zip(sorted(sums), total))
        out["loss"] /= max(updates, 1)
        out["kl"] /= max(updates, 1)
        out["clipfrac"] /= max(out.pop("clip_tokens"), 1.0)
        out["first_logprobs"] = first_logprobs
        return out
