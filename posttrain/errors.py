"""Errors meant for users.

A ``UserError`` describes a problem with the user's input (a recipe key, a data
row, a path) and is printed as one paragraph by the CLI, with exit status 2 and
no traceback. Internal bugs raise ordinary exceptions and keep their tracebacks.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad config, bad data, missing path."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} {hint}")


class ConfigError(UserError):
    """A recipe or override that does not validate."""


class DataError(UserError):
    """A data file or row that does not match the expected format."""


class InvalidRow(DataError):
    """A well-formed row that cannot be trained on as it is (e.g. its prompt alone fills data.max_length):
    an error by default, a counted skip under ``data.invalid_rows: skip``."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite. Not a bug in the user's input as such, but theirs to fix (learning
    rate, data, precision); printed without a traceback, exit status 3, the last checkpoint left intact."""

    exit_code = 3


class RolloutRankFailed(UserError):
    """A rollout rank of a disaggregated run died, failed or stayed silent past ``rollout.timeout``. Printed as
    soon as it is found (the launcher may stop the other processes moments later), exit status 4; the last
    checkpoint is intact and ``resume=auto`` continues from it."""

    exit_code = 4


def print_user_error(err: UserError) -> None:
    """One paragraph on one line (the terminal wraps it; grep still finds it); an error is printed once."""
    import sys

    if getattr(err, "printed", False):
        return
    text = err.message if err.hint is None else f"{err.message} {err.hint}"
    print("error: " + " ".join(text.split()), file=sys.stderr, flush=True)
    err.printed = True
