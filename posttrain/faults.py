"""Fault injection for resume tests: ``POSTTRAIN_FAULT_KILL_AFTER_STEP=N`` sends SIGKILL to this
process right after optimizer step N (after any checkpoint of that step is written), the same
as an operator's ``kill -9`` at that moment but reproducible. Unset in normal runs.
"""

from __future__ import annotations

import os
import signal


def maybe_kill(step: int) -> None:
    target = os.environ.get("POSTTRAIN_FAULT_KILL_AFTER_STEP")
    rank = os.environ.get("POSTTRAIN_FAULT_RANK")  # unset: every rank dies
    if target and int(target) == step and (rank is None or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
