"""The shared data path of every offline trainer: load, split, check, encode, count what was left out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from posttrain.data.loading import Row, filter_valid, load_rows, skip_reason, split_train_eval
from posttrain.data.tokenize import LengthReport
from posttrain.errors import DataError, InvalidRow


def load_examples(data_cfg, seed: int, check: Callable[[Row], Any],
                  encode: Callable[[Row, LengthReport], Any | None]) -> tuple[list, list, LengthReport, dict[str, int]]:
    """Train and eval examples from ``data_cfg``.

    ``check(row)`` raises ``DataError`` for a malformed row (an error, or a
    counted skip under ``data.invalid_rows: skip``); ``encode(row, report)``
    tokenises and length-filters, returning ``None`` for a counted drop, or
    raises ``InvalidRow`` for a row it cannot use (handled like a malformed one).
    Returns (train, eval, length report, skipped-row counts by reason).
    """
    rows = load_rows(data_cfg.path, split=data_cfg.split, columns=data_cfg.columns)
    if data_cfg.eval_path:
        train_rows, eval_rows = rows, load_rows(data_cfg.eval_path, split=data_cfg.split, columns=data_cfg.columns)
    else:
        train_rows, eval_rows = split_train_eval(rows, data_cfg.eval_fraction, seed)
    report = LengthReport()
    skipped: dict[str, int] = {}

    def encode_all(part: list[Row]) -> list:
        valid, bad = filter_valid(part, check, data_cfg.invalid_rows)
        for reason, count in bad.items():
            skipped[reason] = skipped.get(reason, 0) + count
        encoded = []
        for row in valid:
            try:
                example = encode(row, report)
            except InvalidRow as err:
                if data_cfg.invalid_rows == "error":
                    raise
                reason = skip_reason(err)
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            if example is not None:
                encoded.append(example)
        return encoded

    train, evaluation = encode_all(train_rows), encode_all(eval_rows)
    if not train:
        raise DataError(f"{data_cfg.path}: no training examples left ({report.summary()}; invalid rows skipped: "
                        f"{skipped or 'none'}).")
    return train, evaluation, report, skipped
