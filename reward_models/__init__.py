"""Reward functions, verifiers and scoring models for posttrain."""
