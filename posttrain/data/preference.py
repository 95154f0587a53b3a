"""Paired preference examples (prompt, chosen, rejected): tokenisation, length limits, batching.

Tokenisation follows TRL's DPOTrainer so that the same file gives the same
tokens: string completions get EOS appended; the prompt and each
prompt+completion are tokenised whole, and the completion starts where the
two token sequences diverge (byte-level BPE can merge across the boundary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.data.formats import check_preference
from posttrain.data.loading import Row
from posttrain.data.pipeline import load_examples
from posttrain.data.tokenize import LengthReport, render_chat
from posttrain.errors import DataError


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None  # optional per-pair margin (reward-model training)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def preference_example(tokenizer, row: Row) -> PreferenceExample:
    prompt, chosen, rejected = row.data["prompt"], row.data["chosen"], row.data["rejected"]
    if isinstance(prompt, list):
        prompt_ids = _encode(tokenizer, render_chat(tokenizer, prompt, add_generation_prompt=True))
        chosen_full = _encode(tokenizer, render_chat(tokenizer, prompt + chosen))
        rejected_full = _encode(tokenizer, render_chat(tokenizer, prompt + rejected))
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = _encode(tokenizer, prompt)
        chosen_full = _encode(tokenizer, prompt + (chosen if chosen.endswith(eos) else chosen + eos))
        rejected_full = _encode(tokenizer, prompt + (rejected if rejected.endswith(eos) else rejected + eos))
    start = min(_common_prefix(prompt_ids, chosen_full), _common_prefix(prompt_ids, rejected_full))
    margin = row.data.get("margin")
    if margin is not None and not isinstance(margin, (int, float)):
        raise DataError(f"{row.where}: field 'margin' must be a number, got {margin!r}.")
    return PreferenceExample(prompt_ids[:start], chosen_full[start:], rejected_full[start:],
                             None if margin is None else float(margin))


def fit_preference(example: PreferenceExample, max_length: int, policy: str, where: str,
                   report: LengthReport) -> PreferenceExample | None:
    """``data.overlong`` for pairs: a prompt that leaves no room is never truncated (it is dropped or an error)."""
    longest = len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))
    if longest <= max_length:
        return example
    if policy == "error" or (len(example.prompt_ids) >= max_length and policy != "drop"):
        raise DataError(
            f"{where}: {longest} tokens (prompt {len(example.prompt_ids)}), longer than data.max_length={max_length}.",
            hint="Raise data.max_length, or set data.overlong to 'drop' (or 'truncate' for long completions).",
        )
    if policy == "drop" or len(example.prompt_ids) >= max_length:
        report.dropped_too_long += 1
        return None
    room = max_length - len(example.prompt_ids)
    report.truncated += 1
    return PreferenceExample(example.prompt_ids, example.chosen_ids[:room], example.rejected_ids[:room], example.margin)


def collate_preference(examples: list[PreferenceExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One padded batch: chosen sequences first, then rejected (a single concatenated forward).

    ``completion_mask`` marks completion tokens in ``input_ids``.
    """
    sequences = [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
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
