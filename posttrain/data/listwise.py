"""Listwise preference examples for reward models: one prompt, K >= 2 ranked completions.

Row layout (checked by :func:`posttrain.data.formats.check_listwise`)::

    {"prompt": ..., "completions": [c_1, ..., c_K], "ranks": [r_1, ..., r_K]}     # 1 = best, ties allowed
    {"prompt": ..., "completions": [c_1, ..., c_K], "scores": [s_1, ..., s_K]}    # higher = better

The ranking losses want labels where higher is better. ``scores`` are the labels as they are; ``ranks``
become ``label_i = K - rank_i`` with K the row's own list length, so the best completion of a K-list has
label K - 1 and a rank-K completion label 0 (never negative, as the ``softmax`` loss needs; a row's labels
never depend on the other rows of its batch). Tokenisation is the paired format's
(:func:`posttrain.data.preference.encode_completions`): the prompt's tokens once, then each completion's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.data.formats import check_listwise
from posttrain.data.loading import Row, load_rows
from posttrain.data.pipeline import load_examples
from posttrain.data.preference import collate_sequences, completion_room, encode_completions
from posttrain.data.tokenize import LengthReport
from posttrain.errors import DataError


@dataclass
class ListwiseExample:
    prompt_ids: list[int]
    completion_ids: list[list[int]]  # K completions
    labels: list[float]  # one per completion, higher = better


def rank_labels(ranks: list[int | float]) -> list[float]:
    """``K - rank`` for each rank of a K-list: [1, 2, 2, 4] -> [3.0, 2.0, 2.0, 0.0]."""
    return [float(len(ranks) - r) for r in ranks]


def row_labels(row: Row) -> list[float]:
    """The row's labels, higher = better: its ``scores``, or :func:`rank_labels` of its ``ranks``."""
    if "scores" in row.data:
        return [float(s) for s in row.data["scores"]]
    return rank_labels(row.data["ranks"])


def listwise_example(tokenizer, row: Row) -> ListwiseExample:
    prompt_ids, completion_ids = encode_completions(tokenizer, row.data["prompt"], row.data["completions"])
    return ListwiseExample(prompt_ids, completion_ids, row_labels(row))


def fit_listwise(example: ListwiseExample, max_length: int, policy: str, where: str,
                 report: LengthReport) -> ListwiseExample | None:
    """``data.overlong`` for lists, as for pairs: prompt + the longest completion must fit; ``truncate`` cuts
    every completion to the room the prompt leaves, and a prompt that leaves none is never truncated."""
    longest = max(len(c) for c in example.completion_ids)
    room = completion_room(len(example.prompt_ids), longest, max_length, policy, where, report)
    if room is None or room == longest:
        return None if room is None else example
    return ListwiseExample(example.prompt_ids, [c[:room] for c in example.completion_ids], example.labels)


def collate_listwise(examples: list[ListwiseExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Every completion of every list as one right-padded batch of sum(K_b) sequences, list by list, plus
    ``labels`` and ``mask`` [B, K_max]: lists shorter than the longest are padded (label 0, mask False).
    ``mask`` marks the slots that ``input_ids``' rows fill, in row-major order."""
    batch = collate_sequences([(e.prompt_ids, c) for e in examples for c in e.completion_ids], pad_token_id)
    width = max(len(e.labels) for e in examples)
    labels = torch.zeros((len(examples), width))
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, example in enumerate(examples):
        labels[i, : len(example.labels)] = torch.tensor(example.labels)
        mask[i, : len(example.labels)] = True
    batch["labels"], batch["mask"] = labels, mask
    return batch


def list_scores(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scores of the flattened completions [sum K_b] placed into their lists [B, K_max] (0 in padding)."""
    return flat.new_zeros(mask.shape).masked_scatter(mask, flat)


def check_nonnegative(row: Row) -> None:
    """For the ``softmax`` loss, whose targets are labels / sum(labels): ``scores`` must be >= 0."""
    negative = [s for s in row.data.get("scores") or [] if isinstance(s, (int, float)) and s < 0]
    if negative:
        raise DataError(f"{row.where}: field 'scores' has a negative value ({negative[0]!r}), but "
                        "rm.ranking_loss=softmax needs labels >= 0.",
                        hint="Shift the scores to be non-negative, give 'ranks' instead, or choose another rm.ranking_loss.")


def load_listwise(data_cfg, seed: int, tokenizer, *, nonnegative: bool = False
                  ) -> tuple[list, list, LengthReport, dict[str, int]]:
    """Load, check (per ``data.invalid_rows``), tokenise and length-filter train and eval lists.
    ``nonnegative``: also require scores >= 0 (the ``softmax`` loss)."""
    def check(row: Row) -> None:
        check_listwise(row)
        if nonnegative:
            check_nonnegative(row)

    def encode(row: Row, report: LengthReport):
        return fit_listwise(listwise_example(tokenizer, row), data_cfg.max_length, data_cfg.overlong,
                            row.where, report)

    return load_examples(data_cfg, seed, check, encode)


def _kind(row: Row) -> str:
    return "listwise" if "completions" in row.data else "paired"


def rm_data_kind(data_cfg) -> str:
    """``listwise`` when the reward-model data has ``completions`` columns, else ``paired``. Every row of
    ``data.path`` and ``data.eval_path`` must be of one kind: a mix is a ``DataError`` naming a row of each."""
    kinds: dict[str, str] = {}  # kind -> where its first row is
    for path in (data_cfg.path, data_cfg.eval_path):
        if not path:
            continue
        for row in load_rows(path, split=data_cfg.split, columns=data_cfg.columns):
            kinds.setdefault(_kind(row), row.where)
            if len(kinds) > 1:
                listwise, paired = kinds["listwise"], kinds["paired"]
                raise DataError(
                    f"reward-model data mixes listwise rows with 'completions' (first: {listwise}) and paired rows "
                    f"with 'chosen'/'rejected' (first: {paired}).",
                    hint="Use one layout for data.path and data.eval_path: a pair is a list of 2, "
                         "{completions: [chosen, rejected], ranks: [1, 2]}.",
                )
    return next(iter(kinds), "paired")
