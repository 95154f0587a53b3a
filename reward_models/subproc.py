"""Python worker processes that run ``module:function`` calls, and can be killed when a call hangs.

Workers are fresh interpreters (``python -m reward_models._serve``), not ``multiprocessing``
children: they never re-import the caller's ``__main__`` (so a user's script needs no
``if __name__ == "__main__"`` guard), and they hold no copy of the caller's threads or GPU
state. Calls and results travel pickled over two pipes. A worker exits when its caller
closes the pipes or dies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from multiprocessing.connection import Connection

from reward_models.calling import Outcome

STARTUP_TIMEOUT = 120.0  # seconds for a new worker interpreter to be ready (slow, loaded machines)


class WorkerProcess:
    """One worker interpreter. ``call`` is thread-safe (calls are serialised)."""

    def __init__(self, name: str = "reward-worker") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._send: Connection | None = None
        self._recv: Connection | None = None

    def _start(self, timeout: float) -> None:
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "reward_models._serve", str(to_child_r), str(to_parent_w)],
            pass_fds=(to_child_r, to_parent_w), stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)),
        )
        os.close(to_child_r)
        os.close(to_parent_w)
        self._send = Connection(to_child_w, readable=False)
        self._recv = Connection(to_parent_r, writable=False)
        # Start-up (an interpreter, imports) does not count against a call's time limit.
        try:
            self._send.send(list(sys.path))
            ready = self._recv.poll(timeout) and self._recv.recv() == ("ready", None)
        except (EOFError, OSError):
            ready = False
        if not ready:
            code = self._proc.poll()
            self._stop()
            why = f"exited with status {code}" if code is not None else f"was not ready within {timeout:g} s"
            raise RuntimeError(f"the {self.name} process {why}")

    def _stop(self) -> None:
        if self._proc is None:
            return
        for conn in (self._send, self._recv):
            conn.close()
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._proc = self._send = self._recv = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def call(self, target: str, *args, timeout: float | None = None, **kwargs) -> Outcome:
        """Run ``target`` (``"module:function"``) in the worker; kill the worker after ``timeout`` s."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._stop()
                try:
                    self._start(STARTUP_TIMEOUT)
                except RuntimeError as err:
                    return Outcome("error", message=str(err))
            try:
                self._send.send((target, args, kwargs))
            except (BrokenPipeError, OSError):
                self._stop()
                return Outcome("error", message=f"the {self.name} process is gone")
            if not self._recv.poll(timeout):
                self._stop()
                return Outcome("timeout", message=f"no result after {timeout:g} s ({self.name} process killed)")
            try:
                kind, value = self._recv.recv()
            except (EOFError, OSError):
                code = self._proc.wait()
                self._stop()
                return Outcome("error", message=f"the {self.name} process died (exit status {code})")
            return Outcome("ok", value) if kind == "ok" else Outcome("error", message=value)

    def close(self) -> None:
        with self._lock:
            self._stop()
