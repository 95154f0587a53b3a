"""Calling one reward on one batch: a time limit, then a check of what came back.

``call`` runs a reward and returns an ``Outcome`` (``ok`` with the value, ``error``
with the exception text, or ``timeout``). ``check_values`` turns a returned value
into scores, per-row info and per-row problems (NaN, non-numbers, wrong length).

Where a call runs (``isolation``):
  - ``"thread"`` (default for sync functions): a daemon thread. A call past its time
    limit is reported and abandoned; Python cannot stop a thread, so a hung call keeps
    running in the background until it returns. Use ``"process"`` for rewards that can hang.
  - ``"process"``: a worker process that loads the reward by its spec; a call past its
    limit kills the worker (a new one starts on the next call).
  - ``async def`` rewards run on the event loop and are cancelled at the limit.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass

from reward_models.loading import Reward

ISOLATIONS = ("thread", "process")


@dataclass
class Outcome:
    kind: str  # "ok", "error" or "timeout"
    value: object = None
    message: str = ""


@dataclass
class RowProblem:
    row: int  # index within the batch
    kind: str  # "error", "timeout", "nan", "type", "length"
    message: str


def describe_exception(err: BaseException) -> str:
    """``Type: message`` plus the innermost frame, short enough for a log line."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    text = " ".join(str(err).split())  # one line: it ends up in logs, JSON and one-paragraph errors
    if len(text) > 500:
        text = text[:500] + "..."
    return f"{type(err).__name__}: {text}{where}"


def _run_sync(fn, args: tuple, kwargs: dict):
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):  # a callable object whose __call__ is async
        result = asyncio.run(_await(result))
    return result


async def _await(awaitable):
    return await awaitable


async def in_thread(fn, *args, timeout: float | None, **kwargs) -> Outcome:
    """Run a blocking call in a daemon thread; give up waiting after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def deliver(outcome: Outcome) -> None:
        if not future.done():
            future.set_result(outcome)

    def target() -> None:
        try:
            outcome = Outcome("ok", _run_sync(fn, args, kwargs))
        except Exception as err:  # noqa: BLE001 - a user's reward may raise anything; it is reported
            outcome = Outcome("error", message=describe_exception(err))
        try:
            loop.call_soon_threadsafe(deliver, outcome)
        except RuntimeError:  # the loop closed: the caller stopped waiting (timeout) long ago
            pass

    threading.Thread(target=target, name="reward-call", daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except asyncio.TimeoutError:
        return Outcome("timeout", message=f"no result after {timeout:g} s")


async def call(reward: Reward, prompts: list, completions: list, columns: Mapping[str, list], *,
               timeout: float | None, isolation: str = "thread", worker=None,
               trainer_state: object = None) -> Outcome:
    """Call ``reward`` on a batch within ``timeout`` seconds (None: no limit).

    The arguments follow ``reward_models.convention`` (by keyword, as TRL); a signature they do not fit
    raises its ``UserError`` here, before the call, whatever the failure policy.
    """
    args, kwargs = reward.arguments(prompts, completions, columns, trainer_state)
    if isolation == "process":  # the worker enforces the limit itself, by killing its process
        outcome = await in_thread(worker.call, prompts, completions, dict(columns), timeout=None,
                                  call_timeout=timeout, trainer_state=trainer_state)
        return outcome.value if outcome.kind == "ok" else outcome
    if reward.is_async:
        try:
            value = await asyncio.wait_for(reward.fn(*args, **kwargs), timeout)
        except asyncio.TimeoutError:
            return Outcome("timeout", message=f"no result after {timeout:g} s")
        except Exception as err:  # noqa: BLE001 - reported, with the policy applied by the caller
            return Outcome("error", message=describe_exception(err))
        return Outcome("ok", value)
    # bound first: a column may be named like one of in_thread's own parameters (timeout, fn)
    return await in_thread(functools.partial(reward.fn, *args, **kwargs), timeout=timeout)


def _as_float(value: object) -> float | None:
    """A float for numbers (bool, int, float, numpy scalars, 0-d tensors); None for anything else."""
    if isinstance(value, (str, bytes)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(type(value), "__float__"):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


def check_values(value: object, n: int) -> tuple[list[float | None], list[dict], list[RowProblem]]:
    """Scores, per-row info and per-row problems from what a reward returned for ``n`` rows."""
    info = [{} for _ in range(n)]
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        message = f"returned a {type(value).__name__}, expected a list of {n} numbers or None"
        return [None] * n, info, [RowProblem(i, "length", message) for i in range(n)]
    values = list(value)
    if len(values) != n:
        message = f"returned {len(values)} values for {n} rows"
        return [None] * n, info, [RowProblem(i, "length", message) for i in range(n)]
    extra_info = getattr(value, "info", None)
    if isinstance(extra_info, list) and len(extra_info) == n:
        info = [dict(d) if isinstance(d, Mapping) else {"info": d} for d in extra_info]
    errors = getattr(value, "errors", None) or {}
    scores: list[float | None] = []
    problems: list[RowProblem] = []
    for i, v in enumerate(values):
        if i in errors:
            scores.append(None)
            problems.append(RowProblem(i, "error", str(errors[i])))
            continue
        if v is None:
            scores.append(None)
            continue
        f = _as_float(v)
        if f is None:
            scores.append(None)
            problems.append(RowProblem(i, "type", f"returned {type(v).__name__} {v!r:.60}, expected a number or None"))
        elif not math.isfinite(f):
            scores.append(None)
            problems.append(RowProblem(i, "nan", f"returned {f}"))
        else:
            scores.append(f)
    return scores, info, problems
