"""Many sandboxed programs in parallel, at most ``workers`` at a time.

Each worker thread owns a slot, and each slot its own unprivileged uid, so the
per-user process limit and the leftover sweep of one run never touch another.
The threads only wait on pipes; the programs run in their own processes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from reward_models.sandbox.limits import Limits
from reward_models.sandbox.runner import RunResult, Sandbox


@dataclass
class Job:
    """One program: files for its work dir, the argv to run, bytes for stdin, optional limits."""

    files: Mapping[str, str | bytes]
    argv: Sequence[str]
    stdin: bytes = b""
    limits: Limits | None = None


class SandboxPool:
    """A bounded pool of sandbox runs. Use as a context manager, or call ``close``."""

    def __init__(self, sandbox: Sandbox | None = None, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.sandbox = sandbox or Sandbox()
        self.workers = workers
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(workers):
            self._slots.put(slot)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")
        self._closed = threading.Event()

    def _run(self, job: Job) -> RunResult:
        slot = self._slots.get()
        try:
            return self.sandbox.run(job.files, job.argv, stdin=job.stdin, limits=job.limits, slot=slot)
        finally:
            self._slots.put(slot)

    def submit(self, job: Job) -> Future:
        if self._closed.is_set():
            raise RuntimeError("the sandbox pool is closed")
        return self._executor.submit(self._run, job)

    def map(self, jobs: Sequence[Job]) -> list[RunResult]:
        """Run every job; results in the order of ``jobs``."""
        futures = [self.submit(job) for job in jobs]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Wait for running programs to finish (each is bounded by its limits), then stop."""
        self._closed.set()
        self._executor.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
