"""Trainers (recipes): each is an explicit setup / train / save loop composed from components.

``TRAINERS`` maps a recipe's ``trainer:`` value to the module that implements
it; the module defines ``Config`` (its recipe schema), ``Recipe`` and
``preflight(cfg)`` (cheap checks run before any process is launched).
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType

from posttrain.errors import ConfigError

TRAINERS = {
    "sft": "posttrain.trainers.sft",
    "dpo": "posttrain.trainers.dpo",
    "kto": "posttrain.trainers.kto",
    "rm": "posttrain.trainers.reward_model",
    "prm": "posttrain.trainers.reward_model",
    "grpo": "posttrain.trainers.grpo",
    "ppo": "posttrain.trainers.ppo",
}


def trainer_module(name: str | None, source: str = "the recipe") -> ModuleType:
    if name is None:
        raise ConfigError(f"{source} has no 'trainer' key.", hint=f"Add one of: {', '.join(sorted(TRAINERS))}.")
    if name not in TRAINERS:
        close = difflib.get_close_matches(str(name), list(TRAINERS), n=1)
        hint = f"Did you mean {close[0]!r}?" if close else f"Valid trainers: {', '.join(sorted(TRAINERS))}."
        raise ConfigError(f"unknown trainer {name!r} in {source}.", hint=hint)
    return importlib.import_module(TRAINERS[name])


def recipe_schema(name: str | None, source: str = "the recipe") -> type:
    return trainer_module(name, source).Config
