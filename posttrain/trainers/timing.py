"""Per-stage wall-clock timings of one step, from one context manager."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    """Seconds per named stage of a step (a stage entered twice adds up) and, at ``finish``, the whole step's."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - began)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def finish(self) -> dict[str, float]:
        """The timings, with ``step``: the seconds since the timer started."""
        self.seconds["step"] = time.perf_counter() - self.started
        return self.seconds
