"""Run one untrusted program in the sandbox and say how it ended.

``Sandbox.run(files, args)`` writes ``files`` into a fresh private directory, starts the
supervisor (``_supervisor.py``) that isolates and limits the program, captures stdout and
stderr up to the output limit, and returns a ``RunResult`` whose ``status`` says why it
ended: ``exited`` (see ``exit_code``), ``timeout``, ``memory``, ``crashed`` (killed by a
signal), ``output_limit``, or ``error`` (the sandbox itself failed). The directory is
removed afterwards, and no process of the program is left when ``run`` returns.
"""

from __future__ import annotations

import ast
import logging
import marshal
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reward_models.sandbox.limits import Limits

log = logging.getLogger(__name__)

SUPERVISOR = str(Path(__file__).with_name("_supervisor.py"))
_GRACE_SECONDS = 5.0  # past the wall limit before the caller kills the supervisor itself
_UID_BASE = 2_000_000  # sandbox uids: unused by real accounts; one per (process, slot)
_UID_STRIDE = 256
_warned: set[str] = set()
_warn_lock = threading.Lock()

STATUSES = ("exited", "timeout", "memory", "crashed", "output_limit", "error")


@dataclass
class RunResult:
    """How a sandboxed program ended, with its (capped) output."""

    status: str
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    detail: str = ""
    layers: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "exited" and self.exit_code == 0


def sandbox_uid(slot: int) -> int:
    """The unprivileged uid of a pool slot: distinct per slot and per scoring process, so that
    RLIMIT_NPROC budgets and leftover-process sweeps never mix two concurrent runs."""
    return _UID_BASE + (os.getpid() % 50_000) * _UID_STRIDE + slot % _UID_STRIDE


def _warn_missing_layers(layers: Mapping[str, object]) -> None:
    for name, state in layers.items():
        if state is True:
            continue
        with _warn_lock:
            if name in _warned:
                continue
            _warned.add(name)
        log.warning("sandbox layer %s is not in effect on this machine (%s); the other layers still apply. "
                    "See docs/rewards.md for what each layer guards against.", name, state)


class Sandbox:
    """Runs programs isolated from the host (see ``_supervisor.py`` for the layers).

    ``python``: the interpreter for Python programs (default: this one); ``site_packages``:
    let programs import the packages installed for it (off: standard library only, faster);
    ``namespaces``: use pid/net/mount namespaces (as root, or inside a user namespace otherwise);
    ``base_dir``: where work directories are created (default: the system temp dir).
    Concurrent runs should go through a ``SandboxPool``, which gives each its own slot.
    """

    def __init__(self, limits: Limits | None = None, *, python: str | None = None, site_packages: bool = False,
                 namespaces: bool = True, base_dir: str | None = None) -> None:
        self.limits = limits or Limits()
        self.site_packages = site_packages
        self.namespaces = namespaces
        self.base_dir = base_dir or tempfile.gettempdir()
        if python is None:
            # Without site-packages a venv adds nothing: run its base interpreter directly.
            python = sys.executable if site_packages else os.path.realpath(getattr(sys, "_base_executable",
                                                                                    sys.executable))
        self.python = python
        # The interpreter's installation (the parent of its bin/) must be readable by the sandbox user.
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
        self.reach = sorted({prefix, sys.prefix} if site_packages else {prefix})
        # Covered by an empty tmpfs (with a mount namespace): where tokens, keys and caches live.
        self.hide = sorted({"/root", "/home", os.path.expanduser("~")} - {"/", "", "/tmp", tempfile.gettempdir()})
        self.is_root = os.geteuid() == 0

    def python_argv(self, script: str, *args: str) -> list[str]:
        """argv running ``script`` (a file in the work dir) with the sandbox's interpreter."""
        flags = ["-I"] if self.site_packages else ["-I", "-S"]
        return [self.python, *flags, "-B", script, *args]

    def environment(self, workdir: str) -> dict[str, str]:
        """A clean environment: nothing inherited from the caller (no tokens, keys or proxies)."""
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
                "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}

    def run(self, files: Mapping[str, str | bytes], argv: Sequence[str], *, stdin: bytes = b"",
            limits: Limits | None = None, slot: int = 0) -> RunResult:
        """Run ``argv`` (e.g. ``python_argv("main.py")``) in a fresh work dir holding ``files``."""
        limits = limits or self.limits
        workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-", dir=self.base_dir)
        uid = sandbox_uid(slot) if self.is_root else None
        try:
            for name, content in files.items():
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"sandbox file names must be plain names, got {name!r}")
                path = os.path.join(workdir, name)
                with open(path, "wb") as f:
                    f.write(content.encode() if isinstance(content, str) else content)
                if uid is not None:
                    os.chown(path, uid, uid)
            if uid is not None:
                os.chown(workdir, uid, uid)
            config = {"workdir": workdir, "uid": uid, "gid": uid, "argv": list(argv),
                      "env": self.environment(workdir), "limits": limits.as_dict(),
                      "namespaces": self.namespaces, "reach": self.reach, "hide": self.hide,
                      "parent_pid": os.getpid()}
            return self._supervise(config, stdin, limits)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _supervise(self, config: dict, stdin: bytes, limits: Limits) -> RunResult:
        report_r, report_w = os.pipe()
        config["report_fd"] = report_w
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", SUPERVISOR, marshal.dumps(config).hex()],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(report_w,), env={"PATH": "/usr/bin:/bin"}, start_new_session=True,
            )
        except BaseException:
            os.close(report_r)
            raise
        finally:
            os.close(report_w)
        capture = _Capture(proc, report_r, stdin, limits.output_bytes)
        try:
            capture.collect(deadline=time.monotonic() + limits.wall_seconds + _GRACE_SECONDS)
        finally:
            capture.close()
        result = _verdict(capture, limits)
        _warn_missing_layers(result.layers)
        return result


class _Capture:
    """Feeds stdin, reads stdout/stderr (up to a cap) and the supervisor's report, until it is done."""

    def __init__(self, proc: subprocess.Popen, report_fd: int, stdin: bytes, cap: int) -> None:
        self.proc = proc
        self.cap = cap
        self.out = {"stdout": bytearray(), "stderr": bytearray()}
        self.report = bytearray()
        self.over_limit = False
        self.killed_supervisor = False
        self._stdin = memoryview(stdin)
        self._sel = selectors.DefaultSelector()
        self._sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        self._sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        self._report = os.fdopen(report_fd, "rb", buffering=0)
        self._sel.register(self._report, selectors.EVENT_READ, "report")
        if stdin:
            os.set_blocking(proc.stdin.fileno(), False)
            self._sel.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
        else:
            proc.stdin.close()

    def collect(self, deadline: float) -> None:
        report_done_at = None
        while self._sel.get_map():
            now = time.monotonic()
            if now > deadline and not self.killed_supervisor:
                # The supervisor did not end the run in time (it should): kill it; its
                # child dies with it (PR_SET_PDEATHSIG), and with that child the namespace.
                self.proc.kill()
                self.killed_supervisor = True
                deadline = now + 2.0
            elif now > deadline:
                break
            if report_done_at is not None and now > report_done_at + 1.0:
                break  # the supervisor is done; what still holds the pipes is already being killed
            for key, _ in self._sel.select(timeout=0.1):
                name = key.data
                if name == "stdin":
                    self._feed()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    self._sel.unregister(key.fileobj)
                    if name == "report":
                        report_done_at = time.monotonic()
                    continue
                if name == "report":
                    self.report += chunk
                    continue
                self._keep(name, chunk)

    def _feed(self) -> None:
        try:
            n = os.write(self.proc.stdin.fileno(), self._stdin[:65536])
        except (BrokenPipeError, BlockingIOError) as err:
            if isinstance(err, BlockingIOError):
                return
            n = len(self._stdin)
        self._stdin = self._stdin[n:]
        if not self._stdin:
            self._sel.unregister(self.proc.stdin)
            self.proc.stdin.close()

    def _keep(self, name: str, chunk: bytes) -> None:
        total = len(self.out["stdout"]) + len(self.out["stderr"])
        room = self.cap - total
        if room > 0:
            self.out[name] += chunk[:room]
        if len(chunk) > room and not self.over_limit:
            self.over_limit = True
            try:
                self.proc.send_signal(signal.SIGTERM)  # the supervisor kills the program
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for key in list(self._sel.get_map().values()):
            self._sel.unregister(key.fileobj)
        self._sel.close()
        self._report.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream and not stream.closed:
                stream.close()


def _parse_report(raw: bytes) -> tuple[dict, dict | None, str | None]:
    setup, exit_info, setup_error = {}, None, None
    for line in raw.decode(errors="replace").splitlines():
        try:
            entry = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if not isinstance(entry, dict):
            continue
        setup = entry.get("setup", setup)
        exit_info = entry.get("exit", exit_info)
        setup_error = entry.get("setup_error", setup_error)
    return setup, exit_info, setup_error


def _verdict(capture: _Capture, limits: Limits) -> RunResult:
    setup, exit_info, setup_error = _parse_report(bytes(capture.report))
    stdout = capture.out["stdout"].decode(errors="replace")
    stderr = capture.out["stderr"].decode(errors="replace")
    if exit_info is None:
        detail = "the sandbox supervisor was killed" if capture.killed_supervisor else (
            f"the sandbox supervisor failed (status {capture.proc.returncode}): {stderr[-500:]}")
        return RunResult("error", stdout=stdout, stderr=stderr, detail=detail, layers=setup)
    result = RunResult("exited", exit_info["exit_code"], exit_info["signal"], stdout, stderr,
                       exit_info["wall_seconds"], exit_info["cpu_seconds"], layers=setup)
    sig = result.signal
    if capture.over_limit:
        result.status, result.detail = "output_limit", f"more than {limits.output_bytes} bytes of output"
    elif exit_info["killed_by"] == "wall":
        result.status, result.detail = "timeout", f"wall-clock limit of {limits.wall_seconds:g} s"
    elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and result.cpu_seconds >= limits.cpu_seconds - 0.05):
        result.status, result.detail = "timeout", f"CPU-time limit of {limits.cpu_seconds:g} s"
    elif setup_error is not None:
        result.status, result.detail = "error", f"sandbox setup failed: {setup_error}"
    elif (result.exit_code not in (0, None) or sig is not None) and "MemoryError" in stderr[-4000:]:
        result.status, result.detail = "memory", f"address-space limit of {limits.memory_bytes} bytes"
    elif sig is not None:
        result.status, result.detail = "crashed", f"killed by signal {signal.Signals(sig).name}"
    else:
        result.detail = f"exit status {result.exit_code}"
    return result
