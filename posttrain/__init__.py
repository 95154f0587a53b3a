"""posttrain: post-training for language models (SFT, DPO family, RM/PRM, GRPO, PPO)."""

__version__ = "0.1.0"
