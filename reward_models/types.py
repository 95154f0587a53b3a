"""The small data types every reward shares: outputs with side information, and column declarations.

A reward function returns a plain list of ``float | None`` (TRL's contract). A reward
that has more to say per row (a sandbox verdict, per-step scores) returns a
``RewardOutput``: still a ``list`` of scores, so any TRL-style caller reads it as
one, with ``info`` (one dict per row, written to ``reward_info``) and ``errors``
(row index -> message, for rows the reward could not score) attached.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class RewardOutput(list):
    """Scores (a list) plus per-row ``info`` dicts and per-row ``errors``.

    ``errors`` maps a row index to a message; the value at that index is ignored
    and the row is reported and handled by the failure policy like a raised error.
    """

    def __init__(
        self,
        scores: Iterable[float | None],
        info: list[dict] | None = None,
        errors: Mapping[int, str] | None = None,
    ) -> None:
        super().__init__(scores)
        self.info = info if info is not None else [{} for _ in range(len(self))]
        self.errors = dict(errors or {})
        if len(self.info) != len(self):
            raise ValueError(f"RewardOutput: {len(self)} scores but {len(self.info)} info dicts")


@dataclass(frozen=True)
class Column:
    """A dataset column a reward reads: its name, the accepted Python types, and a phrase for errors."""

    name: str
    types: tuple[type, ...]
    description: str
    required: bool = True

    def check(self, value: object) -> bool:
        """Whether ``value`` is acceptable (``None`` only when the column is optional)."""
        if value is None:
            return not self.required
        if isinstance(value, bool) and bool not in self.types:
            return False
        return isinstance(value, self.types)


def declare_columns(fn, *columns: Column):
    """Attach the columns ``fn`` reads (used by ``posttrain score`` to check rows before scoring)."""
    fn.reward_columns = tuple(columns)
    return fn
