"""``isolation="process"``: a reward runs in a worker process, so a call past its time limit is killed.

The worker loads the reward again from its spec and settings, so the reward must be
given by name, dotted path or file path, not as an in-memory function.
"""

from __future__ import annotations

import asyncio
import inspect
import json

from reward_models.calling import Outcome
from reward_models.loading import Reward
from reward_models.subproc import STARTUP_TIMEOUT, WorkerProcess

_loaded: dict[str, Reward] = {}  # in the worker: rewards already built, by spec and settings


def load(spec: str, args: dict) -> Reward:
    """Runs in the worker process: build the reward once per spec and settings."""
    from reward_models.loading import load_reward

    key = json.dumps([spec, args], sort_keys=True, default=repr)
    if key not in _loaded:
        _loaded[key] = load_reward(spec, **args)
    return _loaded[key]


def preload(spec: str, args: dict) -> None:
    load(spec, args)


def run_reward(spec: str, args: dict, prompts: list, completions: list, columns: dict,
               trainer_state: object = None):
    """Runs in the worker process: call the reward (loading it first if needed), by keyword as TRL does."""
    value = load(spec, args)(prompts, completions, trainer_state=trainer_state, **columns)
    if inspect.isawaitable(value):
        value = asyncio.run(_await(value))
    return value


async def _await(awaitable):
    return await awaitable


class ProcessWorker:
    """Calls of one reward in a worker process; the worker is killed and replaced after a timeout."""

    def __init__(self, reward: Reward) -> None:
        if reward.spec is None:
            raise ValueError(f"reward {reward.name!r} was given as an in-memory function; "
                             "isolation='process' needs a name, 'module:function' or './file.py:function'")
        self.spec = reward.spec
        self.args = reward.args
        self._process = WorkerProcess(f"reward {reward.name!r} worker")

    def call(self, prompts: list, completions: list, columns: dict, call_timeout: float | None,
             trainer_state: object = None) -> Outcome:
        if not self._process.alive:
            # Loading (imports, a model) is not the reward's call: it gets its own, generous limit.
            loaded = self._process.call("reward_models.worker:preload", self.spec, self.args,
                                        timeout=STARTUP_TIMEOUT)
            if loaded.kind != "ok":
                return Outcome(loaded.kind, message=f"loading the reward in its worker: {loaded.message}")
        return self._process.call("reward_models.worker:run_reward", self.spec, self.args, prompts,
                                  completions, columns, trainer_state, timeout=call_timeout)

    def close(self) -> None:
        self._process.close()
