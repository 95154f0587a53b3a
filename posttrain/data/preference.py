"""Preference examples -- paired (prompt, chosen, rejected) and unpaired (prompt, completion, label) --
tokenisation, length limits, batching.

Tokenisation follows TRL's DPOTrainer so that the same file gives the same
tokens: string completions get EOS appended; the prompt and each
prompt+completion are tokenised whole, and the completion starts where the
two token sequences diverge (byte-level BPE can merge across the boundary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from posttrain.data.formats import check_preference, check_unpaired
from posttrain.data.loading import Row
from posttrain.data.pipeline import load_examples
from posttrain.data.tokenize import LengthReport, render_chat
from posttrain.errors import DataError, InvalidRow


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None  # optional per-pair margin (reward-model training)
    # MODPO: the other objectives' rewards of chosen and of rejected (K - 1 each), from the data's
    # margin_rewards_chosen / margin_rewards_rejected columns
    margin_rewards: tuple[list[float], list[float]] | None = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_completions(tokenizer, prompt: str | list, completions: list) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and each completion's ids, as TRL tokenises them (see the module docstring)."""
    if isinstance(prompt, list):
        prompt_ids = _encode(tokenizer, render_chat(tokenizer, prompt, add_generation_prompt=True))
        full = [_encode(tokenizer, render_chat(tokenizer, prompt + c)) for c in completions]
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = _encode(tokenizer, prompt)
        full = [_encode(tokenizer, prompt + (c if c.endswith(eos) else c + eos)) for c in completions]
    start = min(_common_prefix(prompt_ids, ids) for ids in full)
    return prompt_ids[:start], [ids[start:] for ids in full]


def preference_example(tokenizer, row: Row) -> PreferenceExample:
    prompt_ids, (chosen_ids, rejected_ids) = encode_completions(
        tokenizer, row.data["prompt"], [row.data["chosen"], row.data["rejected"]])
    margin = row.data.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise InvalidRow(f"{row.where}: field 'margin' must be a number, got {margin!r}.")
    return PreferenceExample(prompt_ids, chosen_ids, rejected_ids, None if margin is None else float(margin),
                             margin_rewards(row))


def _reward_list(row: Row, field: str) -> list[float]:
    value = row.data[field]
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                         for v in values):
        raise InvalidRow(f"{row.where}: field {field!r} must be a finite number or a non-empty list of them, "
                         f"got {value!r}.")
    return [float(v) for v in values]


def margin_rewards(row: Row) -> tuple[list[float], list[float]] | None:
    """MODPO's per-pair rewards of the other objectives: ``margin_rewards_chosen`` and ``margin_rewards_rejected``
    (a number each, or lists of the same length), or None when the row has neither."""
    fields = ("margin_rewards_chosen", "margin_rewards_rejected")
    present = [f for f in fields if row.data.get(f) is not None]
    if not present:
        return None
    if len(present) == 1:
        missing = next(f for f in fields if f not in present)
        raise InvalidRow(f"{row.where}: field {present[0]!r} is set but {missing!r} is missing; MODPO needs both.")
    chosen, rejected = (_reward_list(row, f) for f in fields)
    if len(chosen) != len(rejected):
        raise InvalidRow(f"{row.where}: 'margin_rewards_chosen' has {len(chosen)} values but "
                         f"'margin_rewards_rejected' has {len(rejected)}.")
    return chosen, rejected


def completion_room(prompt_length: int, longest_completion: int, max_length: int, policy: str, where: str,
                    report: LengthReport) -> int | None:
    """``data.overlong`` for a prompt with several completions (pairs, lists): how many tokens each completion
    may keep (``longest_completion`` when all fit), or None to drop the row. A prompt that leaves no room is
    never truncated (an error, or with ``data.invalid_rows: skip`` a counted skip)."""
    longest = prompt_length + longest_completion
    if longest <= max_length:
        return longest_completion
    if policy == "error":
        raise DataError(
            f"{where}: {longest} tokens (prompt {prompt_length}), longer than data.max_length={max_length}.",
            hint="Raise data.max_length, or set data.overlong to 'drop' (or 'truncate' for long completions).",
        )
    if policy == "drop":
        report.dropped_too_long += 1
        return None
    if prompt_length >= max_length:
        raise InvalidRow(
            f"{where}: the prompt alone fills data.max_length={max_length} ({prompt_length} tokens), "
            "leaving no room for the completions.",
            hint="Raise data.max_length, shorten the prompt, or skip such rows with data.invalid_rows=skip "
                 "(or data.overlong=drop).",
        )
    report.truncated += 1
    return max_length - prompt_length


def fit_preference(example: PreferenceExample, max_length: int, policy: str, where: str,
                   report: LengthReport) -> PreferenceExample | None:
    """``data.overlong`` for pairs (:func:`completion_room`)."""
    longest = max(len(example.chosen_ids), len(example.rejected_ids))
    room = completion_room(len(example.prompt_ids), longest, max_length, policy, where, report)
    if room is None or room == longest:
        return None if room is None else example
    return replace(example, chosen_ids=example.chosen_ids[:room], rejected_ids=example.rejected_ids[:room])


def collate_preference(examples: list[PreferenceExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One padded batch: chosen sequences first, then rejected (a single concatenated forward).

    ``completion_mask`` marks completion tokens in ``input_ids``.
    """
    return collate_sequences([(e.prompt_ids, e.chosen_ids) for e in examples]
                             + [(e.prompt_ids, e.rejected_ids) for e in examples], pad_token_id)


def collate_sequences(sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` for (prompt, completion) pairs."""
    width = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (prompt, completion) in enumerate(sequences):
        ids = prompt + completion
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, len(prompt) : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def load_pairs(data_cfg, seed: int, tokenizer) -> tuple[list, list, LengthReport, dict[str, int]]:
    """Load, check (per ``data.invalid_rows``), tokenise and length-filter train and eval pairs."""
    def encode(row: Row, report: LengthReport):
        return fit_preference(preference_example(tokenizer, row), data_cfg.max_length, data_cfg.overlong,
                              row.where, report)

    return load_examples(data_cfg, seed, check_preference, encode)


@dataclass
class UnpairedExample:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool  # True: desirable


def unpaired_example(tokenizer, row: Row) -> UnpairedExample:
    prompt_ids, (completion_ids,) = encode_completions(tokenizer, row.data["prompt"], [row.data["completion"]])
    return UnpairedExample(prompt_ids, completion_ids, bool(row.data["label"]))


def fit_unpaired(example: UnpairedExample, max_length: int, policy: str, where: str,
                 report: LengthReport) -> UnpairedExample | None:
    """``data.overlong`` for unpaired rows, as for pairs."""
    fitted = fit_preference(PreferenceExample(example.prompt_ids, example.completion_ids, example.completion_ids),
                            max_length, policy, where, report)
    return None if fitted is None else UnpairedExample(fitted.prompt_ids, fitted.chosen_ids, example.label)


def collate_unpaired(examples: list[UnpairedExample], pad_token_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """The batch's (prompt, completion) sequences, then its mismatched ones for KTO's reference point:
    prompt i with completion i - 1 (cyclically, as TRL pairs them), cut to ``max_length``.

    ``labels`` [B] holds each example's desirability."""
    n = len(examples)
    matched = [(e.prompt_ids, e.completion_ids) for e in examples]
    mismatched = [(e.prompt_ids, examples[(i - 1) % n].completion_ids[: max(max_length - len(e.prompt_ids), 1)])
                  for i, e in enumerate(examples)]
    batch = collate_sequences(matched + mismatched, pad_token_id)
    batch["labels"] = torch.tensor([e.label for e in examples])
    return batch


def load_unpaired(data_cfg, seed: int, tokenizer) -> tuple[list, list, LengthReport, dict[str, int]]:
    """Load, check (per ``data.invalid_rows``), tokenise and length-filter train and eval rows."""
    def encode(row: Row, report: LengthReport):
        return fit_unpaired(unpaired_example(tokenizer, row), data_cfg.max_length, data_cfg.overlong, row.where,
                            report)

    return load_examples(data_cfg, seed, check_unpaired, encode)
