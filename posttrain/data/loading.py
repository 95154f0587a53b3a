"""Read rows from local files, saved ``datasets`` directories or the hub.

Every row keeps where it came from (file and 1-based row number) so that a
format error later on can name the exact place to fix.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Row:
    """One example and where it came from."""

    data: dict[str, Any]
    source: str
    number: int  # 1-based row (line number for JSONL)

    @property
    def where(self) -> str:
        return f"{self.source}, row {self.number}"


def not_utf8_error(path: Path, where: str, line: bytes, position: int, reason: str) -> DataError:
    """The error for ``line`` of ``path`` (named by ``where``) whose byte at ``position`` is not UTF-8."""
    return DataError(f"{path}{where}: not UTF-8 text (byte {line[position : position + 1].hex()!r} at byte "
                     f"{position + 1} of that line: {reason}). Re-save the file as UTF-8.")


def _decode_text(path: Path) -> str:
    """The whole file as UTF-8 text; a ``DataError`` naming the line and byte where it is not."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        start = data.rfind(b"\n", 0, err.start) + 1
        number = data.count(b"\n", 0, start) + 1
        raise not_utf8_error(path, f", line {number}", data[start:], err.start - start, err.reason) from None


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise not_utf8_error(path, f", row {number}", raw, err.start, err.reason) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, row {number}: not valid JSON ({err.msg} at column {err.colno}).") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}, row {number}: expected a JSON object, got {type(value).__name__}.")
            rows.append(Row(value, str(path), number))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        value = json.loads(_decode_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}).") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]} style files
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects (or use .jsonl with one object per line).")
    rows = []
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path}, row {number}: expected a JSON object, got {type(item).__name__}.")
        rows.append(Row(item, str(path), number))
    return rows


def _rows_from_dataset(dataset, source: str) -> list[Row]:
    return [Row(dict(item), source, number) for number, item in enumerate(dataset, start=1)]


def _read_with_datasets(path: Path, kind: str) -> list[Row]:
    import datasets

    if kind == "csv":
        _decode_text(path)  # name the line that is not UTF-8 before the csv reader fails on it

    try:
        dataset = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # the datasets library raises many types for a bad file
        raise DataError(f"{path}: could not read as {kind}: {err}") from None
    return _rows_from_dataset(dataset, str(path))


def _read_saved_dataset(path: Path, split: str) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a saved `datasets` directory ({err}).") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: has no split {split!r}; it has {sorted(loaded)}. Set data.split.")
        loaded = loaded[split]
    return _rows_from_dataset(loaded, f"{path}[{split}]")


def _read_hub(name: str, split: str) -> list[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(
            f"data file {name!r} does not exist, and loading it as a hub dataset failed: {type(err).__name__}."
            " Check the path (relative paths start from the directory you run in)."
        ) from None
    return _rows_from_dataset(dataset, f"{name}[{split}]")


def load_rows(path: str, *, split: str = "train", columns: dict[str, str] | None = None) -> list[Row]:
    """Load every row of a data source, renaming columns per ``columns`` (ours -> theirs).

    Raises ``DataError`` naming the file and row for unreadable input, and for
    an empty dataset.
    """
    location = Path(path)
    if location.is_dir():
        rows = _read_saved_dataset(location, split)
    elif location.is_file():
        kind = SUFFIXES.get(location.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unknown file type {location.suffix!r}; use one of {', '.join(SUFFIXES)}.")
        rows = {"jsonl": _read_jsonl, "json": _read_json}.get(kind, lambda p: _read_with_datasets(p, kind))(location)
    elif location.suffix.lower() in SUFFIXES or "/" not in path or path.startswith((".", "/")):
        raise DataError(f"data file {path!r} does not exist (relative paths start from the directory you run in).")
    else:
        rows = _read_hub(path, split)
    if not rows:
        raise DataError(f"{path}: the dataset is empty (no rows).")
    if columns:
        rows = [_rename(row, columns) for row in rows]
    return rows


def _rename(row: Row, columns: dict[str, str]) -> Row:
    data = dict(row.data)
    for ours, theirs in columns.items():
        if theirs in data:
            data[ours] = data.pop(theirs)
        elif ours not in data:
            raise DataError(f"{row.where}: has no column {theirs!r} (mapped to {ours!r} by data.columns).")
    return Row(data, row.source, row.number)


def split_train_eval(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded ``eval_fraction`` of ``rows``; order within each part is kept."""
    if eval_fraction <= 0:
        return list(rows), []
    n_eval = max(1, round(len(rows) * eval_fraction))
    if n_eval >= len(rows):
        raise DataError(f"only {len(rows)} rows: too few to hold out {eval_fraction:.0%} for evaluation.")
    held = set(random.Random(seed).sample(range(len(rows)), n_eval))
    train = [row for i, row in enumerate(rows) if i not in held]
    evaluation = [row for i, row in enumerate(rows) if i in held]
    return train, evaluation


def filter_valid(rows: list[Row], check, policy: str) -> tuple[list[Row], dict[str, int]]:
    """Apply a row check; with ``policy='skip'`` count failures by reason instead of stopping.

    The reason is the error message without its row prefix, so the log shows
    e.g. ``{"missing field 'rejected'": 3}``.
    """
    valid, skipped = [], {}
    for row in rows:
        try:
            check(row)
        except DataError as err:
            if policy == "error":
                raise
            reason = skip_reason(err)
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        valid.append(row)
    return valid, skipped


def skip_reason(err: DataError) -> str:
    """The error message without its row prefix or details, to count skips by."""
    return err.message.split(": ", 1)[-1].split(" (")[0].rstrip(".")
