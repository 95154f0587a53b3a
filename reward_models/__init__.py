"""Reward functions, verifiers and scoring models for posttrain.

A reward function has TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``
(sync or ``async def``) and is called as TRL calls it, by keyword: ``prompts=``, ``completions=`` (for
conversational prompts, lists of one assistant message), ``completion_ids=``, the dataset's columns and
``trainer_state=`` (a ``TrainerState`` in training, None in ``posttrain score``); other signatures follow
the rule in ``reward_models.convention``, and ``trl.rewards`` functions (factories included) work as
they are. Find one by name, dotted path, file path or entry point with ``load_reward``; score batches
with several weighted rewards through ``RewardSet``.
Built-ins: math_verify, bleu, unit_test, code_efficiency, format, length, orm, prm, judge, remote.
See docs/rewards.md.
"""

from reward_models.combine import combine, normalize_column
from reward_models.convention import TrainerState
from reward_models.loading import Reward, load_reward
from reward_models.registry import (
    ENTRY_POINT_GROUP,
    available_rewards,
    register_reward,
    reward_factory,
    unregister_reward,
)
from reward_models.reward_set import (
    BatchScores,
    Ensemble,
    RewardFailure,
    RewardIssue,
    RewardSet,
    RewardSpec,
    combine_rewards,
)
from reward_models.types import Column, RewardOutput, declare_columns

__all__ = [
    "ENTRY_POINT_GROUP",
    "BatchScores",
    "Column",
    "Ensemble",
    "Reward",
    "RewardFailure",
    "RewardIssue",
    "RewardOutput",
    "RewardSet",
    "RewardSpec",
    "TrainerState",
    "available_rewards",
    "combine",
    "combine_rewards",
    "declare_columns",
    "load_reward",
    "normalize_column",
    "register_reward",
    "reward_factory",
    "unregister_reward",
]
