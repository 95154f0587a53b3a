"""The one-step-async schedule's batch in flight (``rollout.schedule: one_step_async``).

While the learners train on step t, the rollout ranks generate step t+1 with the weights before step t's
update (Noukhovitch et al., 2024, "Asynchronous RLHF"). The engine answers requests in order, so the batch in
flight must be collected (``wait``) before the engine takes anything else: new weights, an evaluation, a
refill round. The batch is not checkpointed: a resumed run regenerates it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Prefetched:
    """A step's batch, generated ahead: ``step`` is the step it is for, ``submitted_at`` the step whose
    weights sampled it (its policy lag is ``step - submitted_at``)."""

    step: int
    submitted_at: int
    batch: Any = None


class Prefetcher:
    """At most one batch ahead: ``submit`` starts it on the engine, ``wait`` collects it, ``take`` hands it to
    the step it is for."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.inflight: Prefetched | None = None  # submitted, not yet collected
        self.ready: Prefetched | None = None  # collected, not yet taken

    def submit(self, step: int, submitted_at: int, prompts: list, **sampling) -> None:
        """Start generating step ``step``'s batch with the engine's current weights (those of ``submitted_at``)."""
        self.engine.submit(prompts, **sampling)
        self.inflight = Prefetched(step, submitted_at)

    def wait(self) -> float:
        """Collect the batch in flight, if any; the seconds waited (the part of generation training did not hide)."""
        if self.inflight is None:
            return 0.0
        started = time.perf_counter()
        self.inflight.batch = self.engine.collect()
        self.ready, self.inflight = self.inflight, None
        return time.perf_counter() - started

    def take(self, step: int) -> Prefetched | None:
        """Step ``step``'s prefetched batch (collected first if still in flight), or None when there is none."""
        self.wait()
        ready, self.ready = self.ready, None
        return ready if ready is not None and ready.step == step else None
