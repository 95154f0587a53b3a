"""Row formats (TRL-compatible) and their checks.

| task | columns |
| SFT | ``messages``, or ``prompt`` + ``completion``, or ``text`` |
| preference | ``prompt``, ``chosen``, ``rejected`` (strings or message lists) |
| listwise preference | ``prompt``, ``completions`` (K >= 2 strings or message lists), ``ranks`` (1 = best) or ``scores`` |
| unpaired preference | ``prompt``, ``completion``, ``label`` (bool) |
| prompt-only | ``prompt`` plus any extra columns |
| process reward | ``prompt``, ``completions`` (list of steps), ``labels`` (bools or floats in [0, 1]) |

Each check raises ``DataError`` naming the file, the row and the field.
"""

from __future__ import annotations

import math
from typing import Any

from posttrain.data.loading import Row
from posttrain.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def check_messages(row: Row, field: str, *, need_assistant: bool = False) -> list[dict]:
    value = row.data.get(field)
    if not isinstance(value, list) or not value:
        raise DataError(f"{row.where}: field {field!r} must be a non-empty list of {{role, content}} messages.")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{row.where}: {field}[{i}] must be an object with 'role' and 'content'.")
        if message["role"] not in ROLES:
            raise DataError(
                f"{row.where}: {field}[{i}] has role {message['role']!r}; expected one of {', '.join(ROLES)}."
            )
        if not isinstance(message["content"], str):
            raise DataError(f"{row.where}: {field}[{i}].content must be a string.")
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{row.where}: field {field!r} has no assistant message to train on.")
    return value


def check_text(row: Row, field: str, *, allow_empty: bool = False) -> str:
    value = row.data.get(field)
    if field not in row.data:
        raise DataError(f"{row.where}: missing field {field!r}.")
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field {field!r} must be a string, got {type(value).__name__}.")
    if not allow_empty and not value.strip():
        raise DataError(f"{row.where}: field {field!r} is empty.")
    return value


def check_text_or_messages(row: Row, field: str) -> str | list[dict]:
    value = row.data.get(field)
    if field not in row.data:
        raise DataError(f"{row.where}: missing field {field!r}.")
    if isinstance(value, list):
        return check_messages(row, field)
    return check_text(row, field)


def sft_kind(row: Row) -> str:
    """Which SFT layout a row uses: ``messages``, ``prompt_completion`` or ``text``."""
    if "messages" in row.data:
        check_messages(row, "messages", need_assistant=True)
        return "messages"
    if "prompt" in row.data or "completion" in row.data:
        prompt = check_text_or_messages(row, "prompt")
        completion = check_text_or_messages(row, "completion")
        if isinstance(prompt, list) != isinstance(completion, list):
            raise DataError(f"{row.where}: 'prompt' and 'completion' must both be strings or both message lists.")
        return "prompt_completion"
    if "text" in row.data:
        check_text(row, "text")
        return "text"
    raise DataError(
        f"{row.where}: no SFT columns found (have {sorted(row.data)}); expected 'messages', "
        "'prompt' + 'completion', or 'text'. Map other names with data.columns."
    )


def check_preference(row: Row) -> None:
    """Paired preference row: prompt, chosen, rejected, all strings or all conversational."""
    for field in ("chosen", "rejected"):
        if field not in row.data:
            raise DataError(f"{row.where}: missing field {field!r} (a preference row needs prompt, chosen, rejected).")
    values = [check_text_or_messages(row, f) for f in ("prompt", "chosen", "rejected")]
    if len({isinstance(v, list) for v in values}) > 1:
        raise DataError(f"{row.where}: prompt, chosen and rejected must all be strings or all message lists.")
    if values[1] == values[2]:
        raise DataError(f"{row.where}: 'chosen' and 'rejected' are identical; the pair carries no preference.")


def check_unpaired(row: Row) -> None:
    """Unpaired preference row (KTO): prompt, completion (both strings or both message lists), bool label."""
    if "label" not in row.data:
        raise DataError(f"{row.where}: missing field 'label' (an unpaired row needs prompt, completion, label).")
    values = [check_text_or_messages(row, f) for f in ("prompt", "completion")]
    if isinstance(values[0], list) != isinstance(values[1], list):
        raise DataError(f"{row.where}: 'prompt' and 'completion' must both be strings or both message lists.")
    if not isinstance(row.data["label"], bool):
        raise DataError(f"{row.where}: field 'label' must be true or false, got {row.data['label']!r}.")


def check_prompt_only(row: Row) -> None:
    check_text_or_messages(row, "prompt")


def check_process_reward(row: Row) -> None:
    check_text(row, "prompt")
    steps, labels = row.data.get("completions"), row.data.get("labels")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise DataError(f"{row.where}: field 'completions' must be a non-empty list of non-empty step strings.")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise DataError(f"{row.where}: field 'labels' must be a list with one label per step ({len(steps)}).")
    for i, label in enumerate(labels):
        ok = isinstance(label, bool) or (isinstance(label, (int, float)) and 0.0 <= float(label) <= 1.0)
        if not ok:
            raise DataError(f"{row.where}: labels[{i}] must be a bool or a number in [0, 1], got {label!r}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_listwise(row: Row) -> None:
    """Listwise preference row (reward models): ``prompt``, ``completions`` (K >= 2 strings, or K assistant
    message lists with a message-list prompt) and exactly one of ``ranks`` (integers in 1..K, 1 = best, ties
    allowed) or ``scores`` (finite numbers, higher = better), one per completion, not all equal."""
    data = row.data
    if "completions" in data and ("chosen" in data or "rejected" in data):
        raise DataError(f"{row.where}: has both 'completions' (a listwise row) and 'chosen'/'rejected' (a paired "
                        "row); keep one layout.")
    prompt = check_text_or_messages(row, "prompt")
    completions = data.get("completions")
    if not isinstance(completions, list) or len(completions) < 2:
        got = f"{len(completions)} item" + ("" if len(completions) == 1 else "s") if isinstance(completions, list) \
            else type(completions).__name__
        raise DataError(f"{row.where}: field 'completions' must be a list of at least 2 responses to rank, got {got}.")
    for i, completion in enumerate(completions):
        where = f"completions[{i}]"
        if isinstance(prompt, list):
            if not is_conversation(completion):
                raise DataError(f"{row.where}: {where} must be a message list, as the prompt is one.")
            check_messages(Row({where: completion}, row.source, row.number), where)
        elif not isinstance(completion, str):
            raise DataError(f"{row.where}: {where} must be a string, as the prompt is one; got "
                            f"{type(completion).__name__}.")
        elif not completion.strip():
            raise DataError(f"{row.where}: {where} is empty.")
    has = [key for key in ("ranks", "scores") if key in data]
    if len(has) != 1:
        hint = " (rows with 'labels' are step-labelled PRM data: trainer: prm)" if not has and "labels" in data else ""
        raise DataError(f"{row.where}: a listwise row needs exactly one of 'ranks' (1 = best) or 'scores' (higher = "
                        f"better), got {'both' if has else 'neither'}{hint}.")
    key = has[0]
    values = data[key]
    k = len(completions)
    if not isinstance(values, list) or len(values) != k:
        got = f"{len(values)} entries" if isinstance(values, list) else f"a {type(values).__name__}"
        raise DataError(f"{row.where}: field {key!r} must be a list with one entry per completion ({k}), got {got}.")
    for i, value in enumerate(values):
        if not _is_number(value) or not math.isfinite(value):
            raise DataError(f"{row.where}: {key}[{i}] must be a {'rank' if key == 'ranks' else 'finite number'}, "
                            f"got {value!r}.")
        if key == "ranks" and (not float(value).is_integer() or not 1 <= value <= k):
            raise DataError(f"{row.where}: ranks[{i}] must be an integer from 1 (best) to {k}, got {value!r}.")
    if len(set(values)) == 1:
        raise DataError(f"{row.where}: every completion has the same {key[:-1]}; the list carries no preference.")
