"""Where ``posttrain.trainers`` still imports ``drift_stats``; the functions live in
``posttrain.learner.logprobs`` (also exported by ``posttrain.rollout``)."""

from posttrain.learner.logprobs import drift_stats, token_entropy, token_logprobs

__all__ = ["drift_stats", "token_entropy", "token_logprobs"]
