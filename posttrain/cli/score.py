"""``posttrain score``: score a JSONL file with one or more rewards.

    posttrain score --reward unit_test --reward-arg timeout=5 problems.jsonl --output scored.jsonl
    posttrain score --reward math_verify --weight 1 --reward format --weight 0.2 in.jsonl -o out.jsonl

Each output row is the input row plus ``reward`` (the combined score, or null) and
``reward_info`` (each reward's score, its details such as the sandbox verdict, and any
errors), in input order. ``--reward-arg`` and ``--weight`` apply to the ``--reward``
before them. The output is written to a temporary file and renamed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from posttrain.data.loading import not_utf8_error
from posttrain.errors import DataError, UserError

RESERVED = ("prompts", "completions", "trainer_state")  # reward_models.convention.RESERVED_COLUMNS
_ARG = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)


class RewardAction(argparse.Action):
    """``--reward NAME`` starts a reward entry; ``--reward-arg`` / ``--weight`` fill in the last one."""

    def __call__(self, parser, namespace, value, option_string=None):
        entries = getattr(namespace, "rewards", None) or []
        if option_string == "--reward":
            entries.append({"name": value, "weight": 1.0, "args": {}})
        elif not entries:
            parser.error(f"{option_string} must follow the --reward it applies to")
        elif option_string == "--weight":
            try:
                entries[-1]["weight"] = float(value)
            except ValueError:
                parser.error(f"--weight expects a number, got {value!r}")
        else:
            key, parsed = parse_reward_arg(value, parser)
            entries[-1]["args"][key] = parsed
        namespace.rewards = entries



@contextlib.contextmanager
def atomic_output(dst: Path) -> Iterator:
    """A text file to write ``dst`` through: a temporary file beside it, flushed, synced and moved into place
    only when the block completes; on any error it is removed and ``dst`` is left as it was."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

def parse_reward_arg(text: str, parser: argparse.ArgumentParser | None = None) -> tuple[str, object]:
    """``k=v`` -> (k, v); v is read as JSON when it parses (numbers, true/false/null, lists), else a string."""
    match = _ARG.match(text)
    if not match:
        message = f"--reward-arg expects KEY=VALUE, got {text!r}"
        if parser is not None:
            parser.error(message)
        raise UserError(message + ".")
    key, raw = match.groups()
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def add_reward_options(parser: argparse.ArgumentParser) -> None:
    """--reward/--reward-arg/--weight and the combination and failure settings (score and eval share them)."""
    parser.add_argument("--reward", action=RewardAction, metavar="NAME", required=True,
                        help="a built-in name, an entry point, 'pkg.module:function' or './file.py:function'; "
                             "repeat for several rewards")
    parser.add_argument("--reward-arg", action=RewardAction, metavar="KEY=VALUE",
                        help="an argument of the preceding --reward (VALUE is JSON if it parses, else a string)")
    parser.add_argument("--weight", action=RewardAction, metavar="W", help="weight of the preceding --reward "
                        "(default 1)")
    parser.add_argument("--combine", choices=("sum", "mean", "normalize"), default="sum",
                        help="how weighted rewards combine (see docs/rewards.md; default: sum)")
    parser.add_argument("--on-error", choices=("fail", "zero"), default="fail",
                        help="a reward failing on a row: stop with an error (fail), or score it 0 and warn (zero)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per reward call on a batch")
    parser.add_argument("--workers", type=int, default=2, help="parallel workers for rewards that use them "
                        "(sandbox, math_verify); default 2")


def reward_set_from_args(args: argparse.Namespace):
    from reward_models import RewardSet, RewardSpec

    specs = [RewardSpec.from_dict(entry, f"--reward {entry['name']}") for entry in args.rewards]
    return RewardSet(specs, rule=args.combine, on_error=args.on_error, timeout=args.timeout, workers=args.workers)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "score", help="score a JSONL file with reward functions",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", metavar="INPUT.jsonl", help="rows with 'completion', optional 'prompt', "
                        "and the columns the rewards read")
    parser.add_argument("--output", "-o", required=True, metavar="OUT.jsonl", help="where to write scored rows")
    add_reward_options(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per reward call (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_score, rewards=None)
    return parser


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)


def reward_completion(row: dict) -> object:
    """The completion as rewards receive it: as in training (and in TRL), a conversational row's (a prompt of
    messages) string completion is one assistant message, ``[{"role": "assistant", "content": ...}]``."""
    completion = row["completion"]
    if isinstance(completion, str) and _is_messages(row.get("prompt")):
        return [{"role": "assistant", "content": completion}]
    return completion


def read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for every non-blank line; malformed rows are ``DataError``s naming the line."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise UserError(f"input file {str(path)!r} does not exist.") from None
    except OSError as err:
        raise UserError(f"cannot read input file {str(path)!r}: {err.strerror}.") from None
    with f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise not_utf8_error(path, f", row {number}", raw, err.start, err.reason) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, row {number}: not valid JSON ({err.msg} at column {err.colno}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, row {number}: expected a JSON object, got {type(row).__name__}.")
            yield number, row


def check_row(path: Path, number: int, row: dict, columns: dict) -> None:
    """Raise a ``DataError`` naming the file, row and field when ``row`` cannot be scored."""
    where = f"{path}, row {number}"
    if "completion" not in row:
        raise DataError(f"{where}: missing field 'completion' (the text to score: a string or a list of messages).")
    if not isinstance(row["completion"], str) and not _is_messages(row["completion"]):
        raise DataError(f"{where}: field 'completion' must be a string or a list of {{role, content}} "
                        f"messages, got {type(row['completion']).__name__}.")
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str) and not _is_messages(prompt):
        raise DataError(f"{where}: field 'prompt' must be a string or a list of {{role, content}} messages, "
                        f"got {type(prompt).__name__}.")
    for name in RESERVED:
        if name in row:
            raise DataError(f"{where}: field {name!r} is reserved (rewards receive an argument of that name); "
                            "rename it.")
    check_reward_columns(where, row, columns)


def check_reward_columns(where: str, row: dict, columns: dict) -> None:
    """Raise a ``DataError`` naming ``where`` and the field when ``row`` lacks a column a reward reads, or holds
    one of the wrong type (``columns``: ``RewardSet.columns()``)."""
    for label, declared in columns.items():
        for column in declared:
            value = row.get(column.name)
            if column.name not in row and not column.required:
                continue
            if column.name not in row:
                raise DataError(f"{where}: missing field {column.name!r}, which reward {label!r} reads "
                                f"({column.description}).")
            if not column.check(value):
                raise DataError(f"{where}: field {column.name!r} (read by reward {label!r}) must be "
                                f"{column.description}, got {type(value).__name__}.")


def batch_columns(rows: list[dict]) -> dict[str, list]:
    """The extra columns of a batch, as lists aligned with the rows (None where a row lacks one)."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(k for k in row if k not in ("prompt", "completion", "reward", "reward_info")))
    names.setdefault("completion_ids", None)
    return {name: [row.get(name) for row in rows] for name in names}


def _json_number(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def run_score(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from reward_models import RewardFailure

    if args.batch_size < 1 or args.workers < 1:
        raise UserError("--batch-size and --workers must be at least 1.")
    src, dst = Path(args.input), Path(args.output)
    if not dst.parent.is_dir():
        raise UserError(f"the output directory {str(dst.parent)!r} does not exist.")
    start = time.monotonic()
    with reward_set_from_args(args) as rewards:
        columns = rewards.columns()
        rows = []
        for number, row in read_rows(src):
            check_row(src, number, row, columns)
            rows.append((number, row))
        totals: list[float] = []
        with atomic_output(dst) as out, \
                tqdm(total=len(rows), desc="scoring", unit="row", file=sys.stderr,
                     disable=args.no_progress) as progress:
            for i in range(0, len(rows), args.batch_size):
                batch = rows[i:i + args.batch_size]
                data = [row for _, row in batch]
                try:
                    result = rewards.score([r.get("prompt", "") for r in data], [reward_completion(r) for r in data],
                                           row_ids=[n for n, _ in batch], **batch_columns(data))
                except RewardFailure as err:
                    issue, more = err.issue, f" ({err.others} more in this batch.)" if err.others else ""
                    raise UserError(f"{src}, row {issue.row}: reward {issue.reward!r} failed ({issue.kind}): "
                                    f"{issue.message}.{more}", hint=err.hint) from None
                for j, row in enumerate(data):
                    total = _json_number(result.totals[j])
                    if total is not None:
                        totals.append(total)
                    scored = dict(row, reward=total, reward_info=result.reward_info(j))
                    out.write(json.dumps(scored, ensure_ascii=False, default=str) + "\n")
                progress.update(len(batch))
        elapsed = time.monotonic() - start
        mean = f"{sum(totals) / len(totals):.4f}" if totals else "n/a"
        print(f"scored {len(rows)} rows in {elapsed:.1f} s ({len(rows) / max(elapsed, 1e-9):.1f} rows/s); "
              f"mean reward {mean}; wrote {dst}", file=sys.stderr)
        for label, stats in rewards.stats.items():
            print(f"  {label}: {stats['scored']} scored, {stats['skipped']} skipped, {stats['failed']} failed",
                  file=sys.stderr)
    return 0
