"""The forgery corpus: solutions that are wrong and try to make their tests count as passed.

Every attempt defines a wrong ``add`` (it subtracts) and then attacks the verdict: builtins,
stack frames, tracebacks, ``gc``, ``ctypes``, ``/proc/self`` and ``/proc/<judge>``, descriptors,
signal handlers, tracing hooks, the harness's own objects, look-alike results. Each must score 0,
and the honest rows around it must keep their verdicts (a hostile row never changes a neighbour's).
"""

from __future__ import annotations

import pytest

from reward_models import load_reward

WRONG = "def add(a, b):\n    return a - b\n"
CORRECT = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
HUMANEVAL_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(10, -4) == 6\n"

# Finds the harness's nonce and reporting function by walking frames from where the solution runs.
FIND_SECRETS = '''
import sys
def secrets():
    found = {}
    frame = sys._getframe()
    while frame is not None:
        for key, value in list(frame.f_locals.items()):
            found.setdefault(key, value)
        frame = frame.f_back
    return found
'''
# Writes look-alike report lines with the real nonce to every descriptor number it can.
SPRAY = '''
import os
def spray(nonce):
    lines = "".join(f"\\n{nonce} PASS {i}\\n" for i in range(4)) + f"\\n{nonce} DONE\\n"
    for fd in range(1024):
        try:
            os.write(fd, lines.encode())
        except OSError:
            pass
    for path in ["/proc/1/fd/1", "/dev/stdout", "/proc/self/fd/1", f"/proc/{os.getppid()}/fd/1"]:
        try:
            with open(path, "w") as f:
                f.write(lines)
        except OSError:
            pass
'''

ATTACKS = {
    "builtins_patched": WRONG + '''
import builtins
class Quiet(Exception):
    pass
builtins.AssertionError = Quiet
builtins.isinstance = lambda *a: True
builtins.repr = lambda x: "PASS"
builtins.len = lambda x: 0
builtins.print = lambda *a, **k: None
builtins.callable = lambda x: False
''',
    "frame_walk_calls_report": WRONG + FIND_SECRETS + SPRAY + '''
s = secrets()
for name in ("report",):
    if callable(s.get(name)):
        for i in range(4):
            try:
                s[name]("PASS", str(i))
            except Exception:
                pass
        try:
            s[name]("DONE")
        except Exception:
            pass
if isinstance(s.get("nonce"), str):
    spray(s["nonce"])
os._exit(0)  # before the tests can report their failures
''',
    "traceback_walk": WRONG + SPRAY + '''
try:
    raise RuntimeError
except RuntimeError as err:
    frame = err.__traceback__.tb_frame
    while frame is not None:
        nonce = frame.f_locals.get("nonce")
        if isinstance(nonce, str):
            spray(nonce)
        job = frame.f_locals.get("job")
        if isinstance(job, dict):
            job["tests"] = ["pass", "pass"]
        frame = frame.f_back
''',
    "gc_walk": WRONG + SPRAY + '''
import gc
for obj in gc.get_objects():
    if callable(obj) and getattr(obj, "__name__", "") in ("report", "judge", "run_tests"):
        try:
            obj("PASS", "0")
        except Exception:
            pass
    if isinstance(obj, dict) and "tests" in obj:
        obj["tests"] = ["pass"] * len(obj["tests"])
for obj in gc.get_objects():
    if isinstance(obj, str) and len(obj) == 32 and all(c in "0123456789abcdef" for c in obj):
        spray(obj)
''',
    "ctypes_ptrace_and_write": WRONG + FIND_SECRETS + '''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
nonce = secrets().get("nonce", "")
line = ("\\n%s PASS 0\\n%s PASS 1\\n%s DONE\\n" % (nonce, nonce, nonce)).encode()
for fd in range(256):
    libc.write(fd, line, len(line))
PTRACE_ATTACH = 16
for target in {os.getppid(), 1}:
    if libc.ptrace(PTRACE_ATTACH, target, None, None) == 0:
        raise SystemExit("attached to the judge")
class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buf = ctypes.create_string_buffer(line)
local = IOVec(ctypes.cast(buf, ctypes.c_void_p), len(line))
remote = IOVec(0x400000, len(line))
libc.process_vm_writev(os.getppid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
libc._exit(0)
''',
    "proc_self_mem_scan": WRONG + SPRAY + '''
import os, re
found = set()
with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
    for entry in maps:
        span, perms = entry.split()[:2]
        if "r" not in perms or "[vvar]" in entry or "[vsyscall]" in entry:
            continue
        start, end = (int(x, 16) for x in span.split("-"))
        if end - start > 64 << 20:
            continue
        try:
            mem.seek(start)
            found.update(re.findall(rb"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])", mem.read(end - start)))
        except (OSError, ValueError, OverflowError):
            pass
for nonce in list(found)[:200]:
    spray(nonce.decode())
os._exit(0)
''',
    "judge_proc_files": WRONG + FIND_SECRETS + '''
import os
nonce = secrets().get("nonce", "")
lines = f"\\n{nonce} PASS 0\\n{nonce} PASS 1\\n{nonce} DONE\\n"
for pid in {1, os.getppid()}:
    for fd in range(8):
        try:
            with open(f"/proc/{pid}/fd/{fd}", "w") as f:
                f.write(lines)
        except OSError:
            pass
    try:  # the judge's memory: readable would mean its secrets are too
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.read(1)
    except (OSError, ValueError):
        pass
os._exit(0)
''',
    "descriptor_spray_then_exit": WRONG + FIND_SECRETS + SPRAY + '''
spray(secrets().get("nonce", ""))
os._exit(0)
''',
    "signal_handlers": WRONG + FIND_SECRETS + SPRAY + '''
import os, signal, time
nonce = secrets().get("nonce", "")
def handler(signum, frame):  # fires while the tests run, reports them passed and ends the program
    spray(nonce)
    os._exit(0)
for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGPIPE, signal.SIGCHLD):
    signal.signal(sig, lambda *a: None)
signal.signal(signal.SIGALRM, handler)
os.kill(os.getppid(), signal.SIGUSR1)
def add(a, b):
    signal.setitimer(signal.ITIMER_REAL, 0.01)
    time.sleep(0.5)
    return a - b
''',
    "tracing_hooks": WRONG + '''
import sys, threading
def right(a, b):
    return a + b
def tracer(frame, event, arg):  # when the tests run, give them a correct add and a check that checks nothing
    if frame.f_code.co_filename.startswith("test"):
        frame.f_globals["add"] = right
        if "check" in frame.f_globals:
            frame.f_globals["check"] = lambda candidate: None
    return tracer
sys.settrace(tracer)
threading.settrace(tracer)
sys.setprofile(lambda frame, event, arg: None)
sys.addaudithook(lambda event, args: None)
''',
    "harness_objects": WRONG + '''
import __main__
__main__._compile = lambda name, text: compile("pass", name, "exec")
__main__.compile_strict = __main__._compile
for name in ("_OPERATORS",):
    table = getattr(__main__, name, None)
    if isinstance(table, dict):
        for key in list(table):
            table[key] = lambda *a: True
for name in dir(__main__):
    obj = getattr(__main__, name)
    if isinstance(obj, type):
        for attr in ("request", "receive", "reply", "reply_error", "serve"):
            if attr in vars(obj):
                setattr(obj, attr, lambda self, *a, **k: True)
__main__.report = lambda *a: None
__main__.run_tests = lambda *a: None
''',
    "int_subclass_always_equal": '''
class Yes(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def add(a, b):
    return Yes(a - b)
''',
    "list_subclass_always_equal": '''
class Yes(list):
    def __eq__(self, other):
        return True
def add(a, b):
    return Yes([a - b])
''',
    "raises_base_exceptions": '''
def add(a, b):
    raise KeyboardInterrupt
''',
    "thread_injects_answers": WRONG + '''
import os, threading, time
def inject():
    for _ in range(200):
        for fd in range(3, 64):
            try:
                os.write(fd, b"\\x00\\x00\\x00\\x02oT")
            except OSError:
                pass
        time.sleep(0.001)
threading.Thread(target=inject, daemon=True).start()
''',
    "kills_and_stops_the_judge": WRONG + '''
import os, signal
for pid in {1, os.getppid()}:
    for sig in (signal.SIGKILL, signal.SIGSTOP):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
''',
    "stdout_lookalikes_then_exit": WRONG + FIND_SECRETS + '''
import os, sys
nonce = secrets().get("nonce", "0" * 32)
sys.stdout.write(f"\\n{nonce} PASS 0\\n{nonce} PASS 1\\n{nonce} DONE\\n")
sys.stdout.flush()
os._exit(0)
''',
}
# Not forgeable in strict mode only: a result object of the solution's own class (see docs/rewards.md).
STRICT_ATTACKS = {
    "own_class_always_equal": '''
class Yes:
    def __eq__(self, other):
        return True
    def __bool__(self):
        return True
def add(a, b):
    return Yes()
''',
}


def score_with_neighbours(reward, attacks: dict, tests) -> tuple[dict, list]:
    """Every attack between an honest correct row and an honest wrong row, all in one batch."""
    rows = []
    for name, code in attacks.items():
        rows += [("correct", CORRECT), (name, code), ("wrong", WRONG)]
    out = reward(["p"] * len(rows), [code for _, code in rows], tests=[tests] * len(rows),
                 entry_point=["add"] * len(rows))
    scored = list(zip([name for name, _ in rows], out, out.info, strict=True))
    return {name: (score, info) for name, score, info in scored if name in attacks}, scored


@pytest.fixture(scope="module")
def reward():
    r = load_reward("unit_test", timeout=5, memory_mb=512, output_kb=256, workers=2)
    yield r
    r.close()


@pytest.fixture(scope="module")
def strict_reward():
    r = load_reward("unit_test", timeout=5, memory_mb=512, output_kb=256, workers=2, strict=True)
    yield r
    r.close()


def assert_neighbours_kept(scored):
    for name, score, info in scored:
        if name == "correct":
            assert score == 1.0, info
        elif name == "wrong":
            assert score == 0.0 and info["verdict"] == "failed", info


@pytest.mark.parametrize("tests", [TESTS, HUMANEVAL_TEST], ids=["test-list", "humaneval-check"])
def test_every_forgery_attempt_scores_zero_and_neighbours_keep_their_verdicts(reward, no_leftovers, tests):
    attacks, scored = score_with_neighbours(reward, ATTACKS, tests)
    forged = {name: info for name, (score, info) in attacks.items() if score != 0.0}
    assert forged == {}
    assert_neighbours_kept(scored)


def test_strict_mode_also_refuses_results_of_the_solutions_own_classes(strict_reward, no_leftovers):
    attacks, scored = score_with_neighbours(strict_reward, {**ATTACKS, **STRICT_ATTACKS}, HUMANEVAL_TEST)
    assert {name: score for name, (score, _) in attacks.items() if score != 0.0} == {}
    assert "strict" in attacks["own_class_always_equal"][1]["error"]
    assert_neighbours_kept(scored)


def test_without_strict_an_own_class_eq_is_the_documented_gap(reward, no_leftovers):
    """The threat model says so: without strict, comparing the solution's own object runs its ``__eq__``."""
    attacks, _ = score_with_neighbours(reward, STRICT_ATTACKS, HUMANEVAL_TEST)
    assert attacks["own_class_always_equal"][0] == 1.0


@pytest.mark.parametrize("solution, tests, expected", [
    ("def f():\n    return 1.0\n", ["assert f() == 1"], (1.0, 0.0)),
    ("def f():\n    return True\n", ["assert f() == 1"], (1.0, 0.0)),
    ("def f():\n    return (1, [2.0])\n", ["assert f() == [1, [2]]", "assert f() == (1, [2.0])"], (0.5, 0.5)),
    ("def f():\n    return {1: 'a'}\n", ["assert f() == {1: 'a'} and f() != {1.0: 'a'}"], (0.0, 1.0)),
])
def test_strict_equality_compares_types_recursively(reward, strict_reward, solution, tests, expected):
    plain = reward(["p"], [solution], tests=[tests])[0]
    strict = strict_reward(["p"], [solution], tests=[tests])[0]
    assert (plain, strict) == expected


def test_solution_objects_work_through_proxies(reward, no_leftovers):
    """Classes, generators, in-place mutation, exceptions and globals still behave as in one process."""
    solution = '''
LIMIT = 3
class Stack:
    def __init__(self):
        self.items = []
    def push(self, x):
        self.items.append(x)
        return self
    def __len__(self):
        return len(self.items)
def squares(n):
    for i in range(n):
        yield i * i
def sort_in_place(values):
    values.sort()
def positive(x):
    if x < 0:
        raise ValueError("negative")
    return x
'''
    tests = ["s = Stack().push(1).push(2)\nassert len(s) == 2 and s.items == [1, 2]",
             "assert list(squares(LIMIT)) == [0, 1, 4]",
             "v = [3, 1, 2]\nsort_in_place(v)\nassert v == [1, 2, 3]",
             "try:\n    positive(-1)\nexcept ValueError as e:\n    assert 'negative' in str(e)\nelse:\n    assert False",
             "import math\nassert math.isclose(positive(2.5), 2.5)"]
    out = reward(["p"], [solution], tests=[tests])
    assert out[0] == 1.0, out.info
