"""``format``: 1.0 when the completion has the required structure, else 0.0.

The structure is a regular expression (``pattern``) or, by default, a sequence of
tags that must each appear exactly once, in order, and make up the whole completion
(whitespace aside): ``tags=["think", "answer"]`` accepts
``<think>...</think><answer>...</answer>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from posttrain.errors import UserError
from reward_models.registry import reward_factory
from reward_models.text import completion_text

DEFAULT_TAGS = ("think", "answer")
_MODES = ("fullmatch", "search", "match")


def tags_pattern(tags: Sequence[str]) -> str:
    """A regex accepting ``<t1>...</t1> <t2>...</t2> ...``: each tag once, in order, nothing around them."""
    parts = []
    for tag in tags:
        t = re.escape(tag)
        parts.append(rf"<{t}>(?:(?!</?{t}>).)*</{t}>")  # the body may not open or close the same tag
    return r"\s*" + r"\s*".join(parts) + r"\s*"


@reward_factory
def format_reward(*, pattern: str | None = None, tags: Sequence[str] | None = None, mode: str = "fullmatch",
                  dotall: bool = True, ignore_case: bool = False):
    """Build the reward from ``pattern`` (a regex) or ``tags`` (default ``["think", "answer"]``).

    ``mode``: ``fullmatch`` (the whole completion), ``match`` (at its start) or ``search`` (anywhere).
    ``pattern`` is matched with DOTALL (``.`` crosses newlines) unless ``dotall=False``.
    """
    if pattern is not None and tags is not None:
        raise UserError("format reward: give either 'pattern' or 'tags', not both.")
    if mode not in _MODES:
        raise UserError(f"format reward: mode must be one of {', '.join(_MODES)}, got {mode!r}.")
    if tags is not None and (isinstance(tags, str) or not all(isinstance(t, str) and t for t in tags)):
        raise UserError(f"format reward: tags must be a list of tag names, got {tags!r}.")
    source = pattern if pattern is not None else tags_pattern(tags or DEFAULT_TAGS)
    flags = (re.DOTALL if dotall else 0) | (re.IGNORECASE if ignore_case else 0)
    try:
        regex = re.compile(source, flags)
    except re.error as err:
        raise UserError(f"format reward: invalid pattern {source!r}: {err}.") from None
    matcher = getattr(regex, mode)

    def format_check(prompts: list, completions: list, **columns) -> list[float]:
        return [1.0 if matcher(completion_text(c)) else 0.0 for c in completions]

    format_check.__name__ = "format"
    return format_check
