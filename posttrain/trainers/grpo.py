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
  - DeepSpeed ZeRO 0-3, LoRA, 1..N processes, checkpoints and exact ``resume=auto`` on CPU

Assumes:
  - prompt-only data (``prompt`` plus columns the rewards read, e.g. ``answer``)
  - ``train.max_steps`` rollout steps; ``train.global_batch_size`` sequences per optimizer step

DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models (Shao et al., 2024);
HybridFlow: A Flexible and Efficient RLHF Framework (Sheng et al., 2024) for the colocated design.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from posttrain import algorithms
from posttrain.config.schema import ConfigError, doc
from posttrain.data.sampler import GlobalBatchSampler
from posttrain.distributed import DistInfo, all_reduce_sum
from posttrain.errors import DataError
from posttrain.faults import maybe_kill, maybe_poison_loss
from posttrain.learner import build_learner
from posttrain.learner.engine import apply_lora
from posttrain.models.loading import check_model_path, load_causal_lm, load_tokenizer
from posttrain.rollout import RolloutConfig, RolloutEngine, sync_weights, token_logprobs
from posttrain.rollout.logprobs import drift_stats
from posttrain.trainers.common import RecipeConfig, check_finite_loss, check_output_dir, seed_everything
from posttrain.trainers.harness import RunHarness, progress_bar, run_identity, should_checkpoint
from posttrain.trainers.online import PromptRow, evaluate_generation, load_prompts, score_samples
from posttrain.trainers.reference import FrozenReference

log = logging.getLogger("posttrain")


@dataclass
class GRPOSettings:
    prompts_per_step: int = doc(8, "Prompts per rollout step (over all ranks); each gets rollout.n samples.")
    epochs: int = doc(1, "Optimisation passes over each rollout batch.")
    estimator: str = doc("grpo", "Advantage estimator (see docs/algorithms.md): grpo, dr_grpo, rloo, bnpo, ...")
    estimator_args: dict = doc({}, "Options of the estimator, e.g. {scale: batch} for GRPO.")
    policy_loss: str = doc("ppo", "Policy loss: ppo, gspo, cispo, clip_cov, kl_cov.")
    policy_loss_args: dict = doc({"clip_low": 0.2, "clip_high": 0.2}, "Options of the policy loss (clip ranges, dual_clip, ...).")
    loss_agg: str = doc("token-mean", "Loss aggregation: token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm.")
    kl_coef: float = doc(0.0, "Weight of the KL to the reference policy (0: no reference model is loaded).")
    kl_estimator: str = doc("k3", "KL estimator: k1, k2, k3, low_var_kl.")
    kl_in: Literal["loss", "reward"] = doc("loss", "Put the KL penalty in the loss (GRPO) or subtract it from the reward.")
    entropy_coef: float = doc(0.0, "Entropy bonus weight.")
    dynamic_sampling: bool = doc(False, "Leave out groups whose rewards are all equal (DAPO); counted in metrics.")
    tis_cap: float | None = doc(None, "Truncated importance sampling: weight tokens by min(pi_learner/pi_sampler, cap).")
    rewards: list[dict] = doc([{"name": "math_verify"}], "Rewards: [{name, weight, args}], by registry name, 'pkg.mod:fn' or './file.py:fn'.")
    reward_rule: Literal["sum", "mean", "normalize"] = doc("sum", "How weighted rewards combine (docs/rewards.md).")
    reward_on_error: Literal["fail", "zero"] = doc("fail", "A reward that raises, hangs or returns NaN: stop with an error naming it and the row, or score 0 and count it.")
    reward_timeout: float = doc(120.0, "Seconds one reward call may take.")
    max_prompt_length: int = doc(256, "Longest prompt in tokens; longer ones follow data.overlong (drop or error).")
    nonfinite_loss: Literal["stop", "skip"] = doc("stop", "A non-finite loss: stop with an error (the last checkpoint stays intact), or skip: drop that micro-batch's gradient and count it (nonfinite_skipped).")
    eval_prompts: int = doc(200, "Held-out prompts scored at each evaluation (greedy).")
    sync_bucket_mb: int = doc(256, "Weight-sync bucket size in MiB (bounds the extra memory of a sync).")

    def validate(self, source: str) -> None:
        for registry, name, key in ((algorithms.ADVANTAGE_ESTIMATORS, self.estimator, "estimator"),
                                    (algorithms.POLICY_LOSSES, self.policy_loss, "policy_loss"),
                                    (algorithms.LOSS_AGGREGATIONS, self.loss_agg, "loss_agg"),
                                    (algorithms.KL_ESTIMATORS, self.kl_estimator, "kl_estimator")):
            if name not in registry:
                raise ConfigError(f"grpo.{key} in {source}: {registry.unknown_message(name)}")
        if not self.rewards:
            raise ConfigError(f"grpo.rewards in {source} is empty; name at least one reward.")


@dataclass
class Config(RecipeConfig):
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(n=8, temperature=1.0, max_tokens=64,
                                                                         enforce_eager=True),
                                   metadata={"help": "vLLM sampling and engine settings (rollout.n is the group size)."})
    grpo: GRPOSettings = field(default_factory=GRPOSettings, metadata={"help": "GRPO settings."})


def batch_plan(cfg: Config, world_size: int, source: str) -> dict[str, int]:
    """The batch arithmetic, checked up front with a message that says which numbers must divide which."""
    g, train = cfg.grpo, cfg.train
    sequences = g.prompts_per_step * cfg.rollout.n
    if train.max_steps is None:
        raise ConfigError(f"train.max_steps is not set in {source}: online recipes run a number of rollout steps.")
    if g.prompts_per_step % world_size:
        raise ConfigError(f"grpo.prompts_per_step ({g.prompts_per_step}) in {source} must be a multiple of the "
                          f"number of processes ({world_size}): each rank samples whole groups.")
    if sequences % train.global_batch_size:
        raise ConfigError(f"grpo.prompts_per_step x rollout.n = {sequences} sequences per rollout in {source} must be "
                          f"a multiple of train.global_batch_size ({train.global_batch_size}), the sequences per "
                          "optimizer step.")
    per_rank = train.micro_batch_size * world_size
    if train.global_batch_size % per_rank:
        raise ConfigError(f"train.global_batch_size ({train.global_batch_size}) in {source} must be a multiple of "
                          f"train.micro_batch_size ({train.micro_batch_size}) x processes ({world_size}) = {per_rank}.")
    mini_batches = sequences // train.global_batch_size
    return {"sequences": sequences, "mini_batches": mini_batches, "grad_accum": train.global_batch_size // per_rank,
            "optimizer_steps": train.max_steps * g.epochs * mini_batches}


def preflight(cfg: Config, world_size: int, source: str) -> str:
    check_model_path(cfg.model.path)
    plan = batch_plan(cfg, world_size, source)
    check_output_dir(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    train, evaluation, report, skipped = load_prompts(cfg.data, cfg.seed, tokenizer, cfg.grpo.max_prompt_length)
    if len(train) < cfg.grpo.prompts_per_step:
        raise DataError(f"{cfg.data.path}: {len(train)} prompts are fewer than grpo.prompts_per_step "
                        f"({cfg.grpo.prompts_per_step}).")
    build_rewards(cfg).close()  # resolves every reward name, path and argument
    return (f"{len(train)} train / {len(evaluation)} eval prompts ({report.summary()}; invalid rows skipped: "
            f"{skipped or 'none'}); {plan['optimizer_steps']} optimizer steps")


def build_rewards(cfg: Config):
    from reward_models import RewardSet, RewardSpec

    specs = [RewardSpec.from_dict(item, f"grpo.rewards[{i}]") for i, item in enumerate(cfg.grpo.rewards)]
    return RewardSet(specs, rule=cfg.grpo.reward_rule, on_error=cfg.grpo.reward_on_error,
                     timeout=cfg.grpo.reward_timeout)


class Recipe:
    def __init__(self, cfg: Config, dist: DistInfo, source: str = "the recipe") -> None:
        self.cfg = cfg
        self.dist = dist
        self.source = source

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, dist = self.cfg, self.dist
        seed_everything(cfg.seed)
        check_output_dir(cfg)
        self.plan = batch_plan(cfg, dist.world_size, self.source)
        self.tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
        self.prompts, self.eval_prompts, report, skipped = load_prompts(cfg.data, cfg.seed, self.tokenizer,
                                                                         cfg.grpo.max_prompt_length)
        self.eval_prompts = self.eval_prompts[: cfg.grpo.eval_prompts]
        self.sampler = GlobalBatchSampler(len(self.prompts), cfg.grpo.prompts_per_step, seed=cfg.seed,
                                          shuffle=cfg.data.shuffle)
        self.total_steps = cfg.train.max_steps
        log.info("prompts: %d train / %d eval; %s; invalid rows skipped: %s; %d steps of %d prompts x %d samples, "
                 "%d optimizer steps", len(self.prompts), len(self.eval_prompts), report.summary(), skipped or "none",
                 self.total_steps, cfg.grpo.prompts_per_step, cfg.rollout.n, self.plan["optimizer_steps"])
        self.rewards = build_rewards(cfg)
        self.learner = self._setup_learner()
        self.reference = self._setup_reference()
        self.spo = algorithms.SPOValueTracker() if cfg.grpo.estimator == "spo" else None
        self.run = RunHarness(cfg, dist, run_identity(cfg, estimator=cfg.grpo.estimator, n=cfg.rollout.n,
                                                      prompts_per_step=cfg.grpo.prompts_per_step))
        state = self.run.restore(self.learner)
        if self.spo is not None and state.get("spo"):
            self.spo.load_state_dict(state["spo"])
        self.run.open_metrics()
        self.engine = RolloutEngine(cfg.rollout.model or cfg.model.path, cfg.rollout, tokenizer=self.tokenizer)
        if self.run.start_step:  # the engine loaded the initial weights: bring it to the checkpoint's
            self.sync()

    def _setup_learner(self):
        cfg = self.cfg
        model = load_causal_lm(cfg.model)
        if cfg.model.lora.enabled:
            model = apply_lora(model, cfg.model.lora)
        return build_learner(model, cfg.learner, world_size=self.dist.world_size,
                             micro_batch_size=cfg.train.micro_batch_size, grad_accum=self.plan["grad_accum"],
                             total_steps=self.plan["optimizer_steps"])

    def _setup_reference(self) -> FrozenReference | None:
        cfg = self.cfg
        if cfg.grpo.kl_coef == 0:
            return None
        if cfg.model.lora.enabled:
            return FrozenReference(None, policy=self.learner)
        return FrozenReference(load_causal_lm(cfg.model), zero_stage=cfg.learner.zero_stage)

    def sync(self):
        lora = self.cfg.model.lora
        return sync_weights(self.engine, self.learner.module, bucket_bytes=self.cfg.grpo.sync_bucket_mb * 2**20,
                            lora_scaling=lora.alpha / lora.r if lora.enabled else None)

    # ---------------------------------------------------------------- train
    def train(self) -> dict:
        cfg, run = self.cfg, self.run
        if run.start_step == 0:
            run.history["eval_start"] = self.evaluate()
            run.log(0, {f"eval/{k}": v for k, v in run.history["eval_start"].items()})
        progress = progress_bar(self.total_steps, run.start_step, self.dist.is_main and cfg.logging.progress)
        started = time.perf_counter()
        for step in range(run.start_step, self.total_steps):
            metrics = self.rl_step(step)
            done = step + 1
            if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == self.total_steps:
                evaluation = self.evaluate()
                metrics.update({f"eval/{k}": v for k, v in evaluation.items()})
                if done == self.total_steps:
                    run.history["eval_end"] = evaluation
            if done % cfg.train.log_every == 0 or done == self.total_steps:
                run.log(done, metrics)
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward/mean']:.3f}", sps=f"{metrics['time/samples_per_s']:.1f}")
            if should_checkpoint(cfg, done, self.total_steps):
                self.save(done)
            maybe_kill(done)
        progress.close()
        start, end = run.history.get("eval_start", {}), run.history.get("eval_end", {})
        if self.dist.is_main and end:
            log.info("eval: %s", ", ".join(f"{k} {start.get(k, math.nan):.3f} -> {v:.3f}" for k, v in end.items()))
        return run.finish({"steps": self.total_steps, "eval_start": start, "eval_end": end,
                           "train_seconds": round(time.perf_counter() - started, 2)},
                          [["reward/mean", "eval/reward"], ["eval/accuracy"], ["kl"], ["entropy"], ["time/samples_per_s"],
                           ["drift/abs_diff_max"], ["completion_tokens"]])

    def cleanup(self) -> None:
        """Stop the reward workers and the engine while the process group still exists (vLLM's own
        exit hook would otherwise tear down its groups after ours are gone)."""
        for part in ("rewards", "engine"):
            if getattr(self, part, None) is not None:
                getattr(self, part).close()

    def save(self, step: int) -> None:
        state = {"total_steps": self.total_steps}
        if self.spo is not None:
            state["spo"] = self.spo.state_dict()
        self.run.save(step, self.learner, self.tokenizer, state=state)

    def my_prompts(self, step: int) -> list[PromptRow]:
        """This rank's contiguous share of the step's prompts (whole groups stay on one rank)."""
        share = self.cfg.grpo.prompts_per_step // self.dist.world_size
        (ids,) = self.sampler.micro_batches(step, self.dist.rank, self.dist.world_size, share)
        return [self.prompts[i] for i in ids]

    def rl_step(self, step: int) -> dict:
        cfg, dist, g = self.cfg, self.dist, self.cfg.grpo
        n = cfg.rollout.n
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        rows = self.my_prompts(step)
        # The engine seeds prompt i of a call with seed + i * n. Offsetting by this rank's first global prompt
        # makes every prompt's seed depend only on (run seed, step, global position): 1 or N processes, and a
        # resumed run, sample the same completions.
        first = dist.rank * (g.prompts_per_step // dist.world_size)
        seed = cfg.seed * 1_000_003 + step * 100_003 + first * n
        batch = self.engine.generate([r.prompt for r in rows], n=n, seed=seed)
        self.engine.sleep()
        timings["generate"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        rewards, reward_means, scores = score_samples(self.rewards, rows, batch)
        timings["reward"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        tensors = batch.collate(self.tokenizer.pad_token_id)
        mask = tensors["completion_mask"].float()
        with torch.no_grad():
            old_logprobs, ref_logprobs = self._old_and_ref_logprobs(tensors)
        if g.kl_coef and g.kl_in == "reward":
            penalty = algorithms.sequence_kl(g.kl_estimator, old_logprobs, ref_logprobs, mask)
            rewards = rewards - g.kl_coef * penalty
        advantages = self._advantages(rows, rewards, n)
        keep = torch.ones(len(batch), dtype=torch.bool)
        if g.dynamic_sampling:
            keep = algorithms.dynamic_sampling_mask(rewards, n)
        loss_mask = mask * keep[:, None].float()
        weights = None
        drift = drift_stats(tensors["sampler_logprobs"], old_logprobs, mask)
        if g.tis_cap is not None:
            tis = algorithms.truncated_importance_weights(old_logprobs, tensors["sampler_logprobs"], mask, clip_max=g.tis_cap)
            weights = tis.weights
            drift.update({f"tis_{k}": float(v) for k, v in tis.metrics.items()})
        update = self._update(step, tensors, old_logprobs, ref_logprobs, advantages, loss_mask, weights)
        timings["train"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        sync = self.sync()
        timings["sync"] = time.perf_counter() - t3
        timings["step"] = time.perf_counter() - t0
        return self._metrics(batch, rewards, reward_means, scores, keep, drift, update, sync, timings)

    def _old_and_ref_logprobs(self, tensors) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The learner's log-probs before this step's updates (the PPO 'old' policy) and the reference's."""
        temperature = max(self.cfg.rollout.temperature, 1e-6)
        old, ref = [], []
        size = self.cfg.train.micro_batch_size
        self.learner.eval()
        for start in range(0, tensors["input_ids"].shape[0], size):
            part = {k: v[start : start + size] for k, v in tensors.items()}
            logits = self.learner(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
            old.append(token_logprobs(logits, part["input_ids"], part["completion_mask"], temperature=temperature))
            if self.reference is not None:
                ref_logits = self.reference.logits(part["input_ids"], part["attention_mask"])
                ref.append(token_logprobs(ref_logits, part["input_ids"], part["completion_mask"], temperature=temperature))
        self.learner.train()
        return torch.cat(old), (torch.cat(ref) if ref else None)

    def _advantages(self, rows: list[PromptRow], rewards: torch.Tensor, n: int) -> torch.Tensor:
        g = self.cfg.grpo
        if self.spo is not None:
            keys = [r.where for r in rows for _ in range(n)]
            return algorithms.group_advantages("spo", rewards, n, tracker=self.spo, keys=keys)
        return algorithms.group_advantages(g.estimator, rewards, n, **g.estimator_args)

    def _update(self, step: int, tensors, old_logprobs, ref_logprobs, advantages, loss_mask,
                weights) -> dict[str, float]:
        cfg, g, dist = self.cfg, self.cfg.grpo, self.dist
        temperature = max(cfg.rollout.temperature, 1e-6)
        local = tensors["input_ids"].shape[0]
        per_mini = local // self.plan["mini_batches"]
        divisor = self.plan["grad_accum"] * dist.world_size
        token_adv = advantages[:, None].expand_as(loss_mask).nan_to_num(0.0)
        sums = {"loss": 0.0, "kl": 0.0, "clipfrac": 0.0, "clip_tokens": 0.0, "nonfinite": 0.0}
        updates = 0
        for _epoch in range(g.epochs):
            for mb in range(self.plan["mini_batches"]):
                rows = slice(mb * per_mini, (mb + 1) * per_mini)
                num_tokens, num_seqs = all_reduce_sum([loss_mask[rows].sum().item(),
                                                       float((loss_mask[rows].sum(1) > 0).sum())])
                agg = {"global_num_tokens": max(num_tokens, 1.0), "global_num_seqs": max(num_seqs, 1.0),
                       "norm_constant": float(cfg.rollout.max_tokens), "gradient_divisor": divisor}
                for start in range(rows.start, rows.stop, cfg.train.micro_batch_size):
                    part = slice(start, min(start + cfg.train.micro_batch_size, rows.stop))
                    logits = self.learner(input_ids=tensors["input_ids"][part],
                                          attention_mask=tensors["attention_mask"][part]).logits
                    logprobs = token_logprobs(logits, tensors["input_ids"][part], tensors["completion_mask"][part],
                                              temperature=temperature)
                    result = algorithms.compute_policy_loss(
                        g.policy_loss, logprobs, old_logprobs[part], token_adv[part], loss_mask[part],
                        loss_agg_mode=g.loss_agg, importance_weights=None if weights is None else weights[part],
                        **agg, **g.policy_loss_args)
                    loss = result.loss
                    if g.kl_coef and g.kl_in == "loss":
                        kl = algorithms.kl_loss(logprobs, ref_logprobs[part], loss_mask[part], kind=g.kl_estimator,
                                                loss_agg_mode=g.loss_agg, **agg)
                        loss = loss + g.kl_coef * kl
                        sums["kl"] += kl.item() / divisor
                    if g.entropy_coef:
                        entropy = algorithms.entropy_from_logits(logits.float() / temperature)
                        loss = loss + algorithms.entropy_bonus(entropy, loss_mask[part], coef=g.entropy_coef,
                                                               loss_agg_mode=g.loss_agg, **agg)
                    loss = maybe_poison_loss(step + 1, loss)
                    # decided together: a rank that stopped alone would leave the others hanging in a collective
                    if all_reduce_sum([0.0 if torch.isfinite(loss) else 1.0])[0] > 0:
                        if g.nonfinite_loss == "stop":
                            check_finite_loss(math.nan, step + 1, self.run.last_checkpoint,
                                              setting="grpo.nonfinite_loss")
                        sums["nonfinite"] += 1 / dist.world_size
                        loss = loss.nan_to_num(0.0, posinf=0.0, neginf=0.0) * 0.0
                    self.learner.backward(loss)
                    self.learner.step()
                    if torch.isfinite(result.loss):
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
        return out

    def _metrics(self, batch, rewards, reward_means, scores, keep, drift, update, sync, timings) -> dict:
        finite = rewards[torch.isfinite(rewards)]
        lengths = [len(s.completion_ids) for s in batch]
        truncated = sum(s.finish_reason == "length" for s in batch)
        empty = sum(not s.text.strip() for s in batch)  # scored like any text; usually 0 reward, kept in the loss
        sums = all_reduce_sum([finite.sum().item(), float(finite.numel()), float((finite * finite).sum().item()),
                               float(sum(lengths)), float(len(batch)), float(truncated), float((~keep).sum()),
                               float(len(scores.issues)), float(empty)])
        r_sum, r_count, r_sq, len_sum, count, trunc, dropped, issues, empty = sums
        mean = r_sum / max(r_count, 1)
        metrics = {
            "reward/mean": mean, "reward/std": math.sqrt(max(r_sq / max(r_count, 1) - mean * mean, 0.0)),
            "reward/unscored": count - r_count, "reward/issues": issues, **reward_means,
            "completion_tokens": len_sum / max(count, 1), "completion/truncated_share": trunc / max(count, 1),
            "completion/empty_share": empty / max(count, 1),
            "filtered_share": dropped / max(count, 1), "loss": update["loss"], "kl": update["kl"],
            "clipfrac": update["clipfrac"], "nonfinite_skipped": update["nonfinite"], "lr": self.learner.lr,
            **{f"drift/{k}": float(v) for k, v in drift.items()}, **sync.as_metrics(),
            **{f"time/{k}_s": v for k, v in timings.items()},
            "time/samples_per_s": count / max(timings["step"], 1e-9),
            "time/sync_share": timings["sync"] / max(timings["step"], 1e-9),
        }
        if self.learner.grad_norm is not None:
            metrics["grad_norm"] = self.learner.grad_norm
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy generation on the held-out prompts (sharded over ranks), scored by the run's rewards."""
        rows = self.eval_prompts[self.dist.rank :: self.dist.world_size]
        local = evaluate_generation(self.engine, rows, self.rewards, n=1, temperature=0.0) if rows else {}
        self.engine.sleep()
        keys = ["reward", "pass@1", "completion_tokens"]
        totals = all_reduce_sum([local.get(k, 0.0) * len(rows) for k in keys] + [float(len(rows))])
        count = max(totals[-1], 1)
        return {"accuracy" if k == "pass@1" else k: v / count for k, v in zip(keys, totals[:-1])}

