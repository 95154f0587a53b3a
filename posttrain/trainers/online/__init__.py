"""Components shared by the online RL recipes (GRPO, PPO), one job a module:

  - ``settings``: ``OnlineSettings`` (prompts per step, rewards and their failure policy, prompt length,
    non-finite loss policy, evaluation, sync buckets), ``batch_plan`` and ``preflight``;
  - ``prompts``: prompt-only rows, the rewards' view of a sample (``score_samples``), evaluation by generation;
  - ``rollouts``: ``OnlineRollouts``, the rollout side of a step (rows, generate, score, sync, evaluate);
  - ``prefetch``: ``Prefetcher``, the one-step-async schedule's batch in flight;
  - ``batches``: the learner side of a rollout batch (mini- and micro-batches, loss aggregation, PF-PPO
    filtration, the non-finite loss policy, the "old" and reference log-probs);
  - ``metrics``: a step's rollout metrics, reduced over ranks.

The recipes compose them; the algorithm of a step (advantages, losses, updates) stays in the recipe. The loop
is ``posttrain.trainers.loop``.
"""

from posttrain.trainers.online.batches import (
    guard_nonfinite,
    loss_aggregation,
    micro_batches,
    mini_batches,
    old_and_ref_logprobs,
    policy_filtration_keep,
)
from posttrain.trainers.online.metrics import global_moments, reduce_drift, rollout_metrics
from posttrain.trainers.online.prefetch import Prefetcher
from posttrain.trainers.online.prompts import (
    VERIFIER_REWARDS,
    PromptRow,
    evaluate_generation,
    expand_columns,
    load_prompts,
    reward_completion,
    score_samples,
)
from posttrain.trainers.online.rollouts import OnlineRollouts
from posttrain.trainers.online.settings import (
    OnlineSettings,
    RewardEnsemble,
    RolloutCorrection,
    batch_plan,
    build_rewards,
    preflight,
    rollout_section,
)

__all__ = [
    "VERIFIER_REWARDS", "OnlineRollouts", "OnlineSettings", "Prefetcher", "PromptRow", "RewardEnsemble",
    "RolloutCorrection", "batch_plan", "build_rewards", "evaluate_generation", "expand_columns", "global_moments",
    "guard_nonfinite", "load_prompts", "loss_aggregation", "micro_batches", "mini_batches", "old_and_ref_logprobs",
    "policy_filtration_keep", "preflight", "reduce_drift", "reward_completion", "rollout_metrics", "rollout_section",
    "score_samples",
]
