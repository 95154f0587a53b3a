"""How a reward function is called: by keyword, as TRL's ``GRPOTrainer`` calls it.

posttrain passes what TRL 1.x passes to a reward function::

    fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)

``columns`` are the dataset's other columns, batched. ``trainer_state`` is a ``TrainerState``
(below) during training and ``None`` where there is no trainer (``posttrain score``). TRL's
``log_extra``/``log_metric`` callbacks are not passed (TRL's own rewards default them to None).

The rule for other signatures (``CallConvention``):

1. ``prompts``, ``completion_ids`` and ``trainer_state`` go only to a function that can take them:
   a parameter of that name, or ``**kwargs``. So ``def f(completions, **kwargs)`` and
   ``def f(completions, solution)`` both work.
2. If the keywords bind to the signature, the call is by keyword.
3. Otherwise, when the function has no parameter named ``completions``, it is called
   positionally: ``fn(prompts, completions, **rest)`` (``def f(p, c, **kw)``).
4. When neither binds, the call is a ``UserError`` naming the reward and what did not fit;
   a signature that can never fit (neither ``completions`` by keyword nor two positional
   parameters) is refused when the reward is loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from posttrain.errors import UserError

# Passed only to functions that can take them (rule 1); ``completions`` always is.
OFFERED = ("prompts", "completion_ids", "trainer_state")
# Names a dataset column cannot have: the reward receives these arguments under them.
RESERVED_COLUMNS = ("prompts", "completions", "trainer_state")


@dataclass(frozen=True)
class TrainerState:
    """The part of TRL's ``trainer_state`` (transformers' ``TrainerState``) posttrain's trainers give rewards.

    ``global_step``: rollout steps completed before the batch being scored (0 for the first batch and for
    the evaluation before training); ``max_steps``: ``train.max_steps``, so ``global_step / max_steps`` is
    the training progress; ``is_world_process_zero`` / ``is_local_process_zero``: whether this process is
    rank 0 (of all processes / of its node). Picklable, so process-isolated rewards receive it too.
    """

    global_step: int = 0
    max_steps: int | None = None
    is_world_process_zero: bool = True
    is_local_process_zero: bool = True


class CallConvention:
    """The argument rule of one reward callable (see the module docstring)."""

    def __init__(self, fn: Callable, name: str) -> None:
        self.name = name
        try:
            self.signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):  # no signature (some builtins): call it as TRL would
            self.signature = None
            return
        params = self.signature.parameters.values()
        self.var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
        self.keyword_names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        self.names_completions = "completions" in self.keyword_names
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        var_pos = any(p.kind is p.VAR_POSITIONAL for p in params)
        if not (self.names_completions or self.var_kw or var_pos or len(positional) >= 2):
            raise UserError(f"reward {name!r} cannot take its arguments: its signature {self.signature} takes "
                            "neither 'completions' by keyword nor (prompts, completions) positionally.",
                            hint="Write it as def reward(prompts, completions, **columns) (TRL's convention) "
                                 "and return one score per completion.")

    def _accepts(self, key: str) -> bool:
        return self.var_kw or key in self.keyword_names

    def arguments(self, prompts: list, completions: list, columns: Mapping[str, object],
                  trainer_state: object = None) -> tuple[tuple, dict]:
        """(positional, keyword) arguments for one call; a ``UserError`` naming the reward when none fit."""
        for key in RESERVED_COLUMNS:
            if key in columns:
                raise UserError(f"reward {self.name!r}: the data has a column {key!r}, a name the reward "
                                "receives another argument under; rename the column.")
        offered = {"prompts": prompts, "completions": completions, "completion_ids": None, **columns,
                   "trainer_state": trainer_state}
        if self.signature is None:
            return (), offered
        keywords = {k: v for k, v in offered.items() if k not in OFFERED or self._accepts(k)}
        try:
            self.signature.bind(**keywords)
            return (), keywords
        except TypeError as err:
            problem, tried = err, ", ".join(f"{k}=" for k in keywords)
        if not self.names_completions:
            rest = {k: v for k, v in keywords.items() if k not in ("prompts", "completions")}
            try:
                self.signature.bind(prompts, completions, **rest)
                return (prompts, completions), rest
            except TypeError as err:
                if not self.var_kw:  # a function without **kwargs was meant to be called positionally
                    problem, tried = err, ", ".join(["prompts", "completions", *(f"{k}=" for k in rest)])
        raise UserError(f"reward {self.name!r} cannot be called with the arguments posttrain passes "
                        f"({tried}): {problem}.",
                        hint="A reward takes prompts, completions and the dataset's columns by name, as in "
                             "TRL: def reward(prompts, completions, **columns). A parameter without a default "
                             "that is not one of these must be a column of the data.")
