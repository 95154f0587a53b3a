"""Main program of a ``WorkerProcess``: receive ``(module:function, args, kwargs)``, send the result.

Run as ``python -m reward_models._serve READ_FD WRITE_FD``. The first message is the
caller's ``sys.path``, so the worker imports what the caller can import.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from multiprocessing.connection import Connection


def _watch_parent(parent: int) -> None:
    # A busy worker does not read its pipe; this notices a dead caller anyway.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _resolve(target: str):
    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def main(read_fd: int, write_fd: int) -> None:
    from reward_models.calling import describe_exception

    inbox = Connection(read_fd, writable=False)
    outbox = Connection(write_fd, readable=False)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    sys.path[:] = inbox.recv()
    outbox.send(("ready", None))
    while True:
        try:
            target, args, kwargs = inbox.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", _resolve(target)(*args, **kwargs))
        except Exception as err:  # noqa: BLE001 - every failure is sent back and reported by the caller
            reply = ("error", describe_exception(err))
        try:
            outbox.send(reply)
        except Exception as err:  # noqa: BLE001 - e.g. an unpicklable result
            outbox.send(("error", f"the result could not be sent back: {describe_exception(err)}"))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
