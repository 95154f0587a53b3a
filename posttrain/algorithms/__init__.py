"""Losses and estimators for post-training, as pure tensor functions.

No models, no I/O, no process groups: trainers pass tensors in (and global counts, where a
quantity spans ranks) and get tensors out. Each family has a registry, so recipes select
algorithms by name:

=============================  ==========================================================
registry                       entry point
=============================  ==========================================================
``PREFERENCE_LOSSES``          :func:`preference_loss` (+ :func:`preference_rewards`)
``ADVANTAGE_ESTIMATORS``       :func:`group_advantages`
``TOKEN_ADVANTAGE_ESTIMATORS`` :func:`gae_advantages`, :func:`egae_advantages`, :func:`reinforce_pp_advantages`, ...
``POLICY_LOSSES``              :func:`compute_policy_loss`
``LOSS_AGGREGATIONS``          :func:`aggregate_loss`
``KL_ESTIMATORS``              :func:`kl_estimate`
``RANKING_LOSSES``             :func:`listwise_ranking_loss`
``ENSEMBLE_REDUCTIONS``        :func:`ensemble_reward`
``OBJECTIVE_COMBINATIONS``     :func:`combine_objectives`
``PAIR_SELECTIONS``            :func:`select_pairs` (+ :func:`rso_select`)
``LENGTH_REWARDS``             :func:`length_reward` (+ :class:`LengthHistory`, HAPO)
=============================  ==========================================================

See ``docs/algorithms.md`` for the table of methods, papers and anchor frameworks.
"""

from posttrain.algorithms._masked import masked_mean, masked_sum, masked_whiten
from posttrain.algorithms.advantages import (
    bnpo_advantages,
    broadcast_advantages,
    discounted_returns,
    dr_grpo_advantages,
    egae_advantages,
    gae_advantages,
    group_advantages,
    group_reward_std,
    grpo_advantages,
    oreal_advantages,
    reinforce_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
    spo_advantages,
)
from posttrain.algorithms.aggregation import aggregate_loss, local_loss_counts
from posttrain.algorithms.filtering import dynamic_sampling_mask, pf_ppo_filter, pf_ppo_weights
from posttrain.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_loss,
    kl_penalized_rewards,
    make_kl_controller,
    sequence_kl,
)
from posttrain.algorithms.length_history import (
    LengthHistory,
    cosine_length_reward,
    length_reward,
    linear_length_reward,
)
from posttrain.algorithms.normalization import RunningMoments, normalize_rewards
from posttrain.algorithms.off_policy import ImportanceWeights, truncated_importance_weights
from posttrain.algorithms.policy import (
    PolicyLossOutput,
    PolicyLossResult,
    cispo_loss,
    clip_cov_loss,
    compute_policy_loss,
    entropy_bonus,
    entropy_from_logits,
    gspo_loss,
    kl_cov_loss,
    oreal_loss,
    ppo_clip_loss,
    value_loss,
)
from posttrain.algorithms.preference import (
    PreferenceRewards,
    kto_kl_reference,
    kto_loss,
    orpo_log_odds_ratio,
    preference_loss,
    preference_rewards,
)
from posttrain.algorithms.registry import (
    ADVANTAGE_ESTIMATORS,
    ENSEMBLE_REDUCTIONS,
    KL_ESTIMATORS,
    LENGTH_REWARDS,
    LOSS_AGGREGATIONS,
    OBJECTIVE_COMBINATIONS,
    PAIR_SELECTIONS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    RANKING_LOSSES,
    TOKEN_ADVANTAGE_ESTIMATORS,
    Registry,
    UnknownNameError,
    get_advantage_estimator,
    get_loss_aggregation,
    get_policy_loss,
    get_preference_loss,
)
from posttrain.algorithms.rejection_sampling import (
    PAIRINGS,
    acceptance_probabilities,
    all_pairs,
    rso_select,
    select_pairs,
    tournament_pairs,
)
from posttrain.algorithms.reward_model import (
    bradley_terry_loss,
    combine_objectives,
    ensemble_reward,
    listwise_ranking_loss,
    mc_value_labels,
    process_advantage_labels,
    process_reward_loss,
)
from posttrain.algorithms.spo import SPOValueTracker, policy_divergence

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ENSEMBLE_REDUCTIONS",
    "KL_ESTIMATORS",
    "LENGTH_REWARDS",
    "LOSS_AGGREGATIONS",
    "OBJECTIVE_COMBINATIONS",
    "PAIRINGS",
    "PAIR_SELECTIONS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "RANKING_LOSSES",
    "TOKEN_ADVANTAGE_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "ImportanceWeights",
    "LengthHistory",
    "PolicyLossOutput",
    "PolicyLossResult",
    "PreferenceRewards",
    "Registry",
    "RunningMoments",
    "SPOValueTracker",
    "UnknownNameError",
    "acceptance_probabilities",
    "aggregate_loss",
    "all_pairs",
    "bnpo_advantages",
    "bradley_terry_loss",
    "broadcast_advantages",
    "cispo_loss",
    "clip_cov_loss",
    "combine_objectives",
    "compute_policy_loss",
    "cosine_length_reward",
    "discounted_returns",
    "dr_grpo_advantages",
    "dynamic_sampling_mask",
    "egae_advantages",
    "ensemble_reward",
    "entropy_bonus",
    "entropy_from_logits",
    "gae_advantages",
    "get_advantage_estimator",
    "get_loss_aggregation",
    "get_policy_loss",
    "get_preference_loss",
    "group_advantages",
    "group_reward_std",
    "grpo_advantages",
    "gspo_loss",
    "kl_cov_loss",
    "kl_estimate",
    "kl_loss",
    "kl_penalized_rewards",
    "kto_kl_reference",
    "kto_loss",
    "length_reward",
    "linear_length_reward",
    "listwise_ranking_loss",
    "local_loss_counts",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "mc_value_labels",
    "normalize_rewards",
    "oreal_advantages",
    "oreal_loss",
    "orpo_log_odds_ratio",
    "pf_ppo_filter",
    "pf_ppo_weights",
    "policy_divergence",
    "ppo_clip_loss",
    "preference_loss",
    "preference_rewards",
    "process_advantage_labels",
    "process_reward_loss",
    "reinforce_advantages",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
    "rloo_advantages",
    "rso_select",
    "select_pairs",
    "sequence_kl",
    "spo_advantages",
    "tournament_pairs",
    "truncated_importance_weights",
    "value_loss",
]
