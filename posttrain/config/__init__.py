"""Typed recipe configuration: dataclasses, YAML loading and dotted overrides."""

from posttrain.config.loader import apply_overrides, from_dict, load_recipe, to_dict
from posttrain.config.schema import (
    CheckpointConfig,
    DataConfig,
    LearnerConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "LearnerConfig",
    "LoggingConfig",
    "LoraConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_recipe",
    "to_dict",
]
