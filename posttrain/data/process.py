"""Process-reward (PRM) examples: a prompt, its solution steps, and a label per step.

Input convention (shared with the ``prm`` reward, so a trained PRM scores unchanged):
``prompt + separator``, then each ``step + separator``, each piece tokenised on
its own (so step boundaries never merge into one token). A step's score is read
at the *last token of that step's piece* (its separator): label 1 = "the
solution is still correct after this step". All other positions are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.data.formats import check_process_reward
from posttrain.data.loading import Row
from posttrain.data.pipeline import load_examples
from posttrain.data.tokenize import IGNORE, LengthReport
from posttrain.errors import DataError
from reward_models.prm import build_prm_inputs


@dataclass
class ProcessExample:
    input_ids: list[int]
    step_positions: list[int]  # index in input_ids where each step's score is read
    labels: list[float]  # one per step: 0/1 (hard) or a Monte-Carlo value in [0, 1] (soft)


def process_example(tokenizer, row: Row, separator: str) -> ProcessExample:
    ids, positions = build_prm_inputs(tokenizer, row.data["prompt"], row.data["completions"], separator)
    return ProcessExample(ids, positions, [float(label) for label in row.data["labels"]])


def fit_process(example: ProcessExample, max_length: int, policy: str, where: str,
                report: LengthReport) -> ProcessExample | None:
    """Truncation keeps the steps that fit whole; nothing left means drop (counted) or error."""
    if len(example.input_ids) <= max_length:
        return example
    if policy == "error":
        raise DataError(f"{where}: {len(example.input_ids)} tokens, longer than data.max_length={max_length}.",
                        hint="Raise data.max_length, or set data.overlong to 'truncate' or 'drop'.")
    kept = [i for i, p in enumerate(example.step_positions) if p < max_length]
    if policy == "drop" or not kept:
        report.dropped_too_long += 1
        return None
    report.truncated += 1
    return ProcessExample(example.input_ids[:max_length], example.step_positions[: len(kept)],
                          example.labels[: len(kept)])


def collate_process(examples: list[ProcessExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Padded ``input_ids``/``attention_mask`` and ``step_labels`` (float; IGNORE off step positions)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    step_labels = torch.full((len(examples), width), float(IGNORE))
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids)
        attention_mask[i, :n] = 1
        step_labels[i, example.step_positions] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "step_labels": step_labels}


def load_process(data_cfg, seed: int, tokenizer, separator: str):
    """Load, check, tokenise and length-filter PRM rows; returns (train, eval, report, skipped)."""
    def encode(row: Row, report: LengthReport):
        return fit_process(process_example(tokenizer, row, separator), data_cfg.max_length, data_cfg.overlong,
                           row.where, report)

    return load_examples(data_cfg, seed, check_process_reward, encode)
