"""``unit_test``: run the completion's code against the ``tests`` column in the sandbox.

``tests`` is Python source run after the solution (score 1.0 or 0.0), or a list of test
snippets (score = the fraction that passed). With an ``entry_point`` (column or argument)
and a single test source that defines ``check(candidate)`` (HumanEval's layout), the
harness calls ``check(<entry_point>)`` after the source ran. Code is taken from the last
fenced ```python block of the completion when it has one (``extract``), else the whole text.

A test passes only when the harness, after the test ran to its end, reports it on its own
copy of stdout tagged with a nonce the solution never sees (``reward_models/_test_harness.py``).
A program that exits early, with status 0 or not, scores only the tests that really finished.

Each row's ``reward_info`` holds the verdict: ``passed``, ``failed`` (``failed_test``,
``error``), ``timeout``, ``memory``, ``crashed``, ``output_limit``, ``exited_early`` or
``sandbox_error``, with ``passed``/``total`` counts and the tail of stderr when it failed.
"""

from __future__ import annotations

import ast
import marshal
import os
import secrets
import sys
import threading
from pathlib import Path

from posttrain.errors import UserError
from reward_models.registry import reward_factory
from reward_models.sandbox import Job, Limits, RunResult, Sandbox, SandboxPool
from reward_models.text import completion_text, extract_code
from reward_models.types import Column, RewardOutput

HARNESS = Path(__file__).with_name("_test_harness.py").read_text()
# The harness compiled once here: compiling its source in every sandboxed run would cost more than a short test.
_LOADER = "import marshal\nwith open('harness.bin', 'rb') as f:\n    exec(marshal.load(f))\n"
MiB = 1024 * 1024
_STDERR_TAIL = 600


def _literal(payload: str) -> dict:
    try:
        value = ast.literal_eval(payload)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    return value if isinstance(value, dict) else {"type": "unknown", "message": payload[:300]}


def judge(run: RunResult, nonce: str, total: int) -> tuple[float, dict]:
    """Score and verdict of one run from the harness's nonce-tagged lines and how the run ended."""
    passed: set[int] = set()
    failures: dict[int, dict] = {}
    done = False
    ended: tuple[str, str] | None = None
    cpu: float | None = None
    for line in run.stdout.splitlines():
        if not line.startswith(nonce + " "):
            continue
        kind, _, rest = line[len(nonce) + 1:].partition(" ")
        if kind == "DONE":
            done = True
        elif kind == "ENDED":
            how, _, code = rest.partition(" ")
            ended = (how, code)
        elif kind == "CPU":
            try:
                cpu = float(rest)
            except ValueError:
                cpu = None
        elif kind in ("PASS", "FAIL"):
            index, _, payload = rest.partition(" ")
            if not index.isdigit() or int(index) >= total:
                continue
            if kind == "PASS":
                passed.add(int(index))
            else:
                failures[int(index)] = _literal(payload)
    passed -= set(failures)
    info: dict = {"passed": len(passed), "total": total}
    if done and len(passed) == total:
        info["verdict"] = "passed"
    elif any(f.get("type") == "MemoryError" for f in failures.values()) or run.status == "memory":
        info["verdict"] = "memory"
    elif done:
        info["verdict"] = "failed"
    elif ended is not None and run.status == "exited":
        how, code = ended
        info["verdict"] = "crashed" if how == "signal" else "exited_early"
        info["detail"] = (f"the solution's process was killed by signal {code}" if how == "signal" else
                          f"the solution's process ended (exit status {code}) before its tests finished")
    elif run.status == "exited":
        info["verdict"] = "exited_early"
        info["detail"] = f"the program ended (exit status {run.exit_code}) before its tests finished"
    elif run.status == "error":
        info["verdict"] = "sandbox_error"
    else:
        info["verdict"] = run.status
    if info["verdict"] != "passed":
        first = min(failures) if failures else None
        if first is not None:
            info["failed_test"] = first
            f = failures[first]
            info["error"] = f"{f.get('type')}: {f.get('message')}" + (f" at {f['where']}" if f.get("where") else "")
        if info["verdict"] != "failed":
            info.setdefault("detail", run.detail)
        info["exit_code"] = run.exit_code
        if run.stderr:
            info["stderr"] = run.stderr[-_STDERR_TAIL:]
    info["wall_seconds"] = round(run.wall_seconds, 3)
    if cpu is not None:
        info["solution_cpu_seconds"] = cpu
    return len(passed) / total, info


class UnitTestReward:
    """The reward; holds a sandbox pool (started on first use, stopped by ``close``)."""

    __name__ = "unit_test"
    reward_columns = (
        Column("tests", (str, list), "Python test source, or a list of test snippets"),
        Column("entry_point", (str,), "the function the tests check (optional)", required=False),
    )

    def __init__(self, sandbox: Sandbox, workers: int, extract: str, entry_point: str | None,
                 strict: bool = False) -> None:
        self.sandbox = sandbox
        self.strict = strict
        self._compiled: dict | None = None
        self.workers = workers
        self.extract = extract
        self.entry_point = entry_point
        self._pool: SandboxPool | None = None
        self._lock = threading.Lock()

    def _get_pool(self) -> SandboxPool:
        with self._lock:
            if self._pool is None:
                self._pool = SandboxPool(self.sandbox, self.workers)
            return self._pool

    def _harness_files(self) -> dict:
        """``main.py`` and, when the sandbox runs this interpreter, the harness as a marshalled code object
        (marshal's format is per Python version; another interpreter gets the source)."""
        if self._compiled is None:
            same = os.path.realpath(self.sandbox.python) in {
                os.path.realpath(p) for p in (sys.executable, getattr(sys, "_base_executable", sys.executable))}
            self._compiled = ({"main.py": _LOADER, "harness.bin": marshal.dumps(compile(HARNESS, "main.py", "exec"))}
                              if same else {"main.py": HARNESS})
        return self._compiled

    def job(self, completion: object, tests: str | list, entry_point: str | None) -> tuple[Job, str, int]:
        """The sandbox job for one row, its nonce, and its number of tests."""
        tests = [tests] if isinstance(tests, str) else [str(t) for t in tests]
        nonce = secrets.token_hex(16)
        solution = extract_code(completion_text(completion), self.extract)
        files = {**self._harness_files(), "solution.bin": marshal.dumps(solution),
                 "tests.bin": marshal.dumps({"tests": tests, "entry_point": entry_point, "strict": self.strict})}
        return Job(files, self.sandbox.python_argv("main.py"), stdin=(nonce + "\n").encode()), nonce, len(tests)

    def __call__(self, prompts: list, completions: list, tests: list | None = None,
                 entry_point: list | None = None, **columns) -> RewardOutput:
        if tests is None:
            raise KeyError("unit_test needs a 'tests' column (test source, or a list of test snippets)")
        entry_points = entry_point if entry_point is not None else [None] * len(completions)
        scores: list[float | None] = [None] * len(completions)
        info: list[dict] = [{} for _ in completions]
        pending = []
        for i, (completion, row_tests, row_entry) in enumerate(zip(completions, tests, entry_points, strict=True)):
            if not row_tests:
                info[i] = {"skipped": "no tests"}
                continue
            job, nonce, total = self.job(completion, row_tests, row_entry or self.entry_point)
            pending.append((i, job, nonce, total))
        pool = self._get_pool()
        futures = [(i, pool.submit(job), nonce, total) for i, job, nonce, total in pending]
        for i, future, nonce, total in futures:
            scores[i], info[i] = judge(future.result(), nonce, total)
        return RewardOutput(scores, info)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None


@reward_factory
def unit_test(*, workers: int = 2, timeout: float = 10.0, cpu_time: float | None = None, memory_mb: int = 1024,
              output_kb: int = 1024, processes: int = 32, extract: str = "last", entry_point: str | None = None,
              site_packages: bool = False, python: str | None = None, strict: bool = False) -> UnitTestReward:
    """Build the reward.

    ``workers``: programs run at once; ``timeout``: wall-clock seconds per program (``cpu_time``
    defaults to the same); ``memory_mb``: address space per process; ``output_kb``: captured
    output before the run is stopped; ``processes``: process/thread limit; ``extract``: which
    fenced code block to use (last, first, all, none); ``entry_point``: default for rows without
    the column; ``site_packages``: let the code import installed packages (default: stdlib only);
    ``python``: interpreter to run the code with (default: the current one); ``strict``: results
    must be plain data and ``==`` in the tests also compares types (HumanEval-style checks).
    """
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"unit_test: workers must be a positive integer, got {workers!r}.")
    if extract not in ("last", "first", "all", "none"):
        raise UserError(f"unit_test: extract must be last, first, all or none, got {extract!r}.")
    try:
        limits = Limits(wall_seconds=float(timeout), cpu_seconds=float(cpu_time or timeout),
                        memory_bytes=int(memory_mb) * MiB, output_bytes=int(output_kb) * 1024,
                        processes=int(processes))
    except (TypeError, ValueError) as err:
        raise UserError(f"unit_test: {err}.") from None
    sandbox = Sandbox(limits, python=python, site_packages=site_packages)
    if not isinstance(strict, bool):
        raise UserError(f"unit_test: strict must be true or false, got {strict!r}.")
    return UnitTestReward(sandbox, workers, extract, entry_point, strict)
