"""Fault injection for tests of the failure paths; every variable is unset in normal runs.

``POSTTRAIN_FAULT_KILL_AFTER_STEP=N`` sends SIGKILL to this process right after step N (after any
checkpoint of that step is written), the same as an operator's ``kill -9`` at that moment but
reproducible. ``POSTTRAIN_FAULT_NAN_LOSS_AT_STEP=N`` turns the loss of step N (1-based) into NaN, as a
diverging run would. ``POSTTRAIN_FAULT_ROLLOUT_KILL_AT_REQUEST=N`` / ``POSTTRAIN_FAULT_ROLLOUT_HANG_AT_REQUEST=N``
make a rollout rank of a disaggregated run die (SIGKILL) or hang for good on receiving its N-th request from
the learners (1-based; the evaluation before step 1 is request 1, then each step's generation and weight
load are one request each, and so is every evaluation). ``POSTTRAIN_FAULT_RANK=R`` limits any of them to
(global) rank R.
"""

from __future__ import annotations

import os
import signal
import threading


def global_rank() -> str:
    """This process's rank in the launch (a TP rollout rank's RANK is its place among the rollout ranks)."""
    return os.environ.get("POSTTRAIN_GLOBAL_RANK", os.environ.get("RANK", "0"))


def _armed(variable: str, step: int) -> bool:
    target = os.environ.get(variable)
    rank = os.environ.get("POSTTRAIN_FAULT_RANK")  # unset: every rank
    return bool(target) and int(target) == step and (rank is None or rank == global_rank())


def maybe_kill(step: int) -> None:
    if _armed("POSTTRAIN_FAULT_KILL_AFTER_STEP", step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_poison_loss(step: int, loss):
    """``loss`` times NaN when ``POSTTRAIN_FAULT_NAN_LOSS_AT_STEP`` names this (1-based) step, else ``loss``."""
    if _armed("POSTTRAIN_FAULT_NAN_LOSS_AT_STEP", step):
        return loss * float("nan")
    return loss


def maybe_fail_rollout(request: int) -> None:
    """Die or hang at this rollout rank's ``request``-th request when a rollout fault names it."""
    if _armed("POSTTRAIN_FAULT_ROLLOUT_KILL_AT_REQUEST", request):
        os.kill(os.getpid(), signal.SIGKILL)
    if _armed("POSTTRAIN_FAULT_ROLLOUT_HANG_AT_REQUEST", request):
        threading.Event().wait()  # never set: silent, alive, holding its connections, as a stuck rank would
