"""Name -> function registries, so recipes can select algorithms by name.

Each registry maps a setting name used in recipes (``policy_loss: ppo``,
``advantage_estimator: grpo``, ...) to a pure function. Modules fill them with
the ``register`` decorator when they are imported; ``posttrain.algorithms``
imports every module, so importing the package is enough to see every name.
Third-party code can register its own functions the same way::

    from posttrain.algorithms import POLICY_LOSSES

    @POLICY_LOSSES.register("my_loss")
    def my_loss(logprobs, old_logprobs, advantages, mask, **kwargs): ...

An unknown name raises :class:`UnknownNameError`, a ``ValueError`` (and a
``ConfigError``, so the CLI reports it as a user error) that lists the valid
names and suggests the closest one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from posttrain.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(ConfigError, ValueError):
    """A name that is not in a registry."""


class Registry:
    """A named mapping from setting names to functions (or classes)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}
        self._needs: dict[str, frozenset[str]] = {}

    def register(self, name: str, fn: F | None = None, *, needs: tuple[str, ...] = ()) -> Any:
        """Register ``fn`` under ``name``; usable as ``@registry.register("name")``.

        ``needs`` declares what the function takes beyond the standard arguments, so trainers can supply
        it and validation can reject a recipe that cannot (see :meth:`needs`)."""

        def add(f: F) -> F:
            if name in self._items and self._items[name] is not f:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._items[name]!r}")
            self._items[name] = f
            self._needs[name] = frozenset(needs)
            return f

        return add if fn is None else add(fn)

    def needs(self, name: str) -> frozenset[str]:
        """What ``name`` declared it needs, e.g. ``{"baseline_rewards"}`` (remax) or ``{"batch_stats"}``
        (statistics over the whole step's batch: every rank must see the gathered batch)."""
        self.get(name)
        return self._needs.get(name, frozenset())

    def get(self, name: str) -> Callable[..., Any]:
        """Return the function registered as ``name``, or raise a ``ValueError`` naming the valid ones."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        valid = ", ".join(sorted(self._items))
        message = f"Unknown {self.kind} {name!r}. Valid names: {valid}."
        close = difflib.get_close_matches(str(name), list(self._items), n=1, cutoff=0.5)
        if close:
            message += f" Did you mean {close[0]!r}?"
        return message

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


POLICY_LOSSES = Registry("policy loss")
ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
TOKEN_ADVANTAGE_ESTIMATORS = Registry("token-level advantage estimator")
PREFERENCE_LOSSES = Registry("preference loss")
LOSS_AGGREGATIONS = Registry("loss aggregation mode")
KL_ESTIMATORS = Registry("KL estimator")
RANKING_LOSSES = Registry("ranking loss")
ENSEMBLE_REDUCTIONS = Registry("reward ensemble reduction")
OBJECTIVE_COMBINATIONS = Registry("multi-objective combination")
PAIR_SELECTIONS = Registry("preference pair selection")
LENGTH_REWARDS = Registry("length reward")


def get_policy_loss(name: str) -> Callable[..., Any]:
    """The policy loss registered as ``name``; a ValueError naming the valid ones otherwise."""
    return POLICY_LOSSES.get(name)


def get_advantage_estimator(name: str) -> Callable[..., Any]:
    """The advantage estimator registered as ``name``; a ValueError naming the valid ones otherwise."""
    return ADVANTAGE_ESTIMATORS.get(name)


def get_preference_loss(name: str) -> Callable[..., Any]:
    """The preference loss registered as ``name``; a ValueError naming the valid ones otherwise."""
    return PREFERENCE_LOSSES.get(name)


def get_loss_aggregation(name: str) -> Callable[..., Any]:
    """The loss aggregation mode registered as ``name``; a ValueError naming the valid ones otherwise."""
    return LOSS_AGGREGATIONS.get(name)
