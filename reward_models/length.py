"""``length``: a target-length term and DAPO's overlong penalty, on the completion's length L.

    target term   (if ``target``):      max(0, 1 - |L - target| / target)              in [0, 1]
    overlong term (if ``max_length``):  with soft = ``soft_zone``, start = max_length - soft:
                                         0                          if L <= start
                                         (start - L) / soft         if start < L <= max_length
                                         -1                         if L > max_length
                                         times ``penalty`` (default 1)                 in [-penalty, 0]
    score = target term + overlong term

The overlong term is DAPO's "soft overlong punishment" (Yu et al., 2025, "DAPO: An
Open-Source LLM Reinforcement Learning System at Scale"), there written with
L_max = ``max_length`` and L_cache = ``soft_zone``.

``unit``: ``tokens`` (the ``completion_ids`` column when the trainer gives it, else the
``tokenizer`` argument's tokenisation of the text), ``chars`` or ``words`` (whitespace-split).
"""

from __future__ import annotations

from posttrain.errors import UserError
from reward_models.registry import reward_factory
from reward_models.text import completion_text

UNITS = ("tokens", "chars", "words")


def target_term(length: int, target: int) -> float:
    return max(0.0, 1.0 - abs(length - target) / target)


def overlong_term(length: int, max_length: int, soft_zone: int) -> float:
    """DAPO's soft overlong punishment: 0, then linear down to -1 over the soft zone, then -1."""
    start = max_length - soft_zone
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / soft_zone
    return -1.0


@reward_factory
def length(*, target: int | None = None, max_length: int | None = None, soft_zone: int | None = None,
           penalty: float = 1.0, unit: str = "tokens", tokenizer: str | None = None):
    """Build the reward; give ``target``, ``max_length`` (with ``soft_zone``), or both."""
    if target is None and max_length is None:
        raise UserError("length reward: give 'target' and/or 'max_length' (with 'soft_zone').")
    if unit not in UNITS:
        raise UserError(f"length reward: unit must be one of {', '.join(UNITS)}, got {unit!r}.")
    if target is not None and (not isinstance(target, int) or target <= 0):
        raise UserError(f"length reward: target must be a positive integer, got {target!r}.")
    if max_length is not None:
        if not isinstance(max_length, int) or max_length <= 0:
            raise UserError(f"length reward: max_length must be a positive integer, got {max_length!r}.")
        soft_zone = soft_zone if soft_zone is not None else max(1, max_length // 4)
        if not isinstance(soft_zone, int) or not 0 < soft_zone <= max_length:
            raise UserError(f"length reward: soft_zone must be an integer in [1, max_length], got {soft_zone!r}.")
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as err:
            raise UserError(f"length reward: cannot load tokenizer {tokenizer!r}: {err}") from None

    def measure(completion: object, ids: object) -> int:
        if unit == "chars":
            return len(completion_text(completion))
        if unit == "words":
            return len(completion_text(completion).split())
        if ids is not None:
            return len(ids)
        if tok is None:
            raise ValueError("unit='tokens' needs the completion_ids column or a 'tokenizer' argument")
        return len(tok(completion_text(completion), add_special_tokens=False)["input_ids"])

    def length_reward(prompts: list, completions: list, completion_ids: list | None = None,
                      **columns) -> list[float]:
        ids_column = completion_ids if completion_ids is not None else [None] * len(completions)
        scores = []
        for completion, ids in zip(completions, ids_column, strict=True):
            n = measure(completion, ids)
            score = target_term(n, target) if target is not None else 0.0
            if max_length is not None:
                score += penalty * overlong_term(n, max_length, soft_zone)
            scores.append(score)
        return scores

    return length_reward
