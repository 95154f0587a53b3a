"""Hostile programs in the sandbox: each is contained, leaves nothing behind, and the host stays healthy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from reward_models import load_reward
from reward_models.sandbox import Job, Limits, Sandbox, SandboxPool
from tests.rewards.conftest import REPO as REPO_ROOT
from tests.rewards.conftest import sandbox_processes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and uid drop need root (CI runs as root)")

FAST = Limits(wall_seconds=2.0, cpu_seconds=2.0, memory_bytes=512 * 1024 * 1024, output_bytes=64 * 1024)


@pytest.fixture
def sandbox(tmp_path, no_leftovers):
    base = tmp_path / "sandboxes"
    base.mkdir()
    sb = Sandbox(FAST, base_dir=str(base))
    yield sb
    assert list(base.iterdir()) == [], "a work directory was left behind"
    host_is_healthy()


def host_is_healthy():
    """The scoring process can still start processes, and sees no sandbox process."""
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, timeout=30).stdout == b"1\n"
    assert sandbox_processes() == []


def run(sb: Sandbox, source: str, **kwargs):
    return sb.run({"main.py": textwrap.dedent(source)}, sb.python_argv("main.py"), **kwargs)


def test_every_layer_is_in_effect(sandbox):
    result = run(sandbox, "import os; print(os.getuid(), os.getpid())")
    assert result.ok
    uid, pid = map(int, result.stdout.split())
    assert uid >= 2_000_000 and pid == 1
    assert all(state is True for state in result.layers.values()), result.layers
    assert set(result.layers) >= {"pid_namespace", "net_namespace", "mount_namespace", "readonly_fs",
                                  "private_workdir", "rlimits", "unprivileged_user", "no_new_privs"}


def test_infinite_loop_times_out(sandbox):
    start = time.monotonic()
    result = run(sandbox, "while True: pass")
    assert result.status == "timeout"
    assert time.monotonic() - start < FAST.wall_seconds + 10  # stopped at its limit, not left running


def test_sleeping_program_hits_wall_clock(sandbox):
    result = run(sandbox, "import time; time.sleep(60)")
    assert result.status == "timeout" and "wall-clock" in result.detail


def test_fork_bomb_is_contained(sandbox):
    result = run(sandbox, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    assert result.status in ("timeout", "crashed")


def test_daemon_that_double_forks_and_setsids_is_killed(sandbox):
    result = run(sandbox, """
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.close(1); os.close(2)
                time.sleep(120)   # a daemon outliving its parent
            os._exit(0)
        print("parent done")
    """)
    assert result.ok and "parent done" in result.stdout
    # the fixture checks that no process of a sandbox uid is alive


def test_daemon_is_killed_without_pid_namespace_too(tmp_path, no_leftovers):
    # With namespaces off, the sweep of the sandbox uid is what kills escapees.
    # Without a mount namespace the interpreter must be readable by the sandbox user as it is.
    python = next(p for p in (os.path.realpath(sys.executable), "/usr/bin/python3") if world_readable(p))
    marker = f"/tmp/posttrain-fallback-{uuid.uuid4().hex}"
    base = tmp_path / "base"
    base.mkdir()
    os.chmod(tmp_path.parent.parent, 0o711)  # pytest's per-user temp root is private (0700)
    for directory in (tmp_path.parent, tmp_path, base):
        os.chmod(directory, 0o711)
    sb = Sandbox(FAST, namespaces=False, base_dir=str(base), python=python)
    result = run(sb, f"""
        import os, time
        open({marker!r}, "w").write("left behind")
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(120)
            os._exit(0)
        print("parent done")
    """)
    assert result.ok and "parent done" in result.stdout
    assert result.layers["pid_namespace"] == "disabled" and result.layers["unprivileged_user"] is True
    assert not os.path.exists(marker)  # the fallback deletes what the sandbox user left in /tmp
    assert list(base.iterdir()) == []


def world_readable(path: str) -> bool:
    parts = path.split("/")
    return all(os.stat("/".join(parts[:i]) or "/").st_mode & 0o001 for i in range(1, len(parts))) and \
        os.path.exists(path)


def test_unreachable_interpreter_without_mount_namespace_is_a_clear_error(tmp_path, no_leftovers):
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    python = hidden / "python3"
    python.symlink_to(os.path.realpath(sys.executable))
    sb = Sandbox(FAST, namespaces=False, base_dir=str(tmp_path), python=str(python))
    sb.reach = [str(hidden)]
    result = run(sb, "print(1)")
    assert result.status == "error" and "not readable by other users" in result.detail


def test_memory_hog_gets_memory_verdict(sandbox):
    roomy = Limits(wall_seconds=20, cpu_seconds=20, memory_bytes=256 * 1024 * 1024)  # slow machines too
    result = run(sandbox, "blocks = []\nwhile True:\n    blocks.append(bytearray(20 * 1024 * 1024))", limits=roomy)
    assert result.status == "memory"
    big = run(sandbox, "x = bytearray(4 * 1024 ** 3)", limits=roomy)
    assert big.status == "memory"


def test_output_flood_is_capped(sandbox):
    result = run(sandbox, "while True:\n    print('x' * 10000)")
    assert result.status == "output_limit"
    assert len(result.stdout) + len(result.stderr) <= FAST.output_bytes


def test_writes_outside_the_work_dir_fail_or_vanish(sandbox, tmp_path):
    marker = f"posttrain-sandbox-escape-{uuid.uuid4().hex}"
    targets = [f"/tmp/{marker}", f"/var/tmp/{marker}", f"/dev/shm/{marker}", f"/etc/{marker}",
               f"/root/{marker}", str(tmp_path / marker), os.path.join(os.getcwd(), marker)]
    result = run(sandbox, f"""
        import os
        for path in {targets!r}:
            try:
                with open(path, "w") as f:
                    f.write("escaped")
                print("wrote", path)
            except OSError as err:
                print("refused", path, err.errno)
        open("inside.txt", "w").write("fine")   # the work dir is writable
        print("inside ok")
    """)
    assert result.ok and "inside ok" in result.stdout
    for path in targets:
        assert not os.path.exists(path), f"{path} was written on the host"
    assert "refused /etc/" in result.stdout and "refused /root/" in result.stdout


def test_environment_secrets_are_not_visible(sandbox, monkeypatch):
    secret = "s3cr3t-" + uuid.uuid4().hex
    monkeypatch.setenv("POSTTRAIN_FAKE_API_KEY", secret)
    result = run(sandbox, """
        import os
        print(dict(os.environ))
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    print(open(f"/proc/{pid}/environ", "rb").read())
                except OSError as err:
                    print("no", pid, err)
        print(os.getppid())
    """)
    assert result.ok
    assert secret not in result.stdout and "POSTTRAIN_FAKE_API_KEY" not in result.stdout
    assert result.stdout.split()[-1] == "0"  # the parent is outside the sandbox's pid namespace


def test_network_connection_to_local_listener_fails(sandbox):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    accepted = []

    def accept():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not accepted:
            try:
                accepted.append(listener.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        result = run(sandbox, f"""
            import socket
            for host in ("127.0.0.1", "localhost", "::1"):
                try:
                    socket.create_connection((host, {port}), timeout=1).sendall(b"leak")
                    print("connected", host)
                except OSError as err:
                    print("blocked", host, err.errno)
        """)
        # the listener really works: a connection from the host is accepted
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        thread.join()
    finally:
        listener.close()
    assert result.ok and "connected" not in result.stdout and result.stdout.count("blocked") == 3
    assert len(accepted) == 1  # only the host's own connection


def test_killing_the_parent_only_kills_the_program(sandbox):
    result = run(sandbox, """
        import os, signal
        print("parent is", os.getppid(), flush=True)
        for target in (os.getppid(), -1):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError as err:
                print("kill", target, "failed", err.errno)
        print("still here")
    """)
    # getppid() is 0 (the supervisor is outside the pid namespace), so kill(0) targets the program's
    # own process group and kill(-1) everything it may signal: the namespace's init (the program
    # itself) ignores both, the supervisor is out of reach, and the run ends normally.
    assert result.ok and "parent is 0" in result.stdout and "still here" in result.stdout


def test_host_files_are_not_readable_where_private(sandbox):
    result = run(sandbox, """
        for path in ("/etc/shadow", "/root/.bash_history"):
            try:
                open(path).read(); print("read", path)
            except OSError as err:
                print("denied", path, err.errno)
    """)
    assert result.ok and "read " not in result.stdout


def test_work_dir_files_and_stdin(sandbox):
    result = sandbox.run({"main.py": "import sys; print(open('data.txt').read(), sys.stdin.read())",
                          "data.txt": "hello"}, sandbox.python_argv("main.py"), stdin=b"from stdin")
    assert result.ok and result.stdout.strip() == "hello from stdin"


def test_pool_runs_in_parallel_and_keeps_order(tmp_path, no_leftovers):
    sb = Sandbox(FAST, base_dir=str(tmp_path))
    with SandboxPool(sb, workers=2) as pool:
        # Each job prints its index and the wall-clock interval it slept (CLOCK_REALTIME is not namespaced).
        code = "import time; t = time.time(); time.sleep(1.0); print({i}, t, time.time())"
        jobs = [Job({"main.py": code.format(i=i)}, sb.python_argv("main.py")) for i in range(4)]
        results = pool.map(jobs)
    fields = [r.stdout.split() for r in results]
    assert [f[0] for f in fields] == ["0", "1", "2", "3"]
    intervals = [(float(f[1]), float(f[2])) for f in fields]
    overlapping = [(a, b) for a in range(4) for b in range(a + 1, 4)
                   if intervals[a][0] < intervals[b][1] and intervals[b][0] < intervals[a][1]]
    assert overlapping, intervals  # two at a time, not one after another
    assert list(tmp_path.iterdir()) == []


HOSTILE_SOLUTIONS = {
    "infinite_loop": "def add(a, b):\n    while True:\n        pass",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "exit_zero": "def add(a, b):\n    return a + b\nimport sys\nsys.exit(0)",
    "os_exit_zero": "import os\nos._exit(0)",
    "exit_in_function": "def add(a, b):\n    import os\n    os._exit(0)",
    "fake_pass_lines": "print('PASS 0')\nprint('DONE')\ndef add(a, b):\n    return 0",
    "memory_hog": "x = bytearray(8 * 1024 ** 3)\ndef add(a, b):\n    return a + b",
    "output_flood": "while True:\n    print('spam' * 1000)",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "read_job_and_cheat": "import os\nprint(os.listdir('.'))\ndef add(a, b):\n    return 0",
    "daemon": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               "        time.sleep(100)\n    os._exit(0)\ndef add(a, b):\n    return 0"),
}


def test_hostile_solutions_score_zero_under_unit_test(no_leftovers):
    reward = load_reward("unit_test", timeout=2, memory_mb=512, output_kb=64)
    try:
        names = list(HOSTILE_SOLUTIONS)
        # exit_zero defines a correct add, then exits: SystemExit cannot skip the tests, so it
        # passes the first test and fails the second (which no correct add passes).
        out = reward(["p"] * len(names), [HOSTILE_SOLUTIONS[n] for n in names],
                     tests=[["assert add(1, 2) == 3", "assert add(2, 2) == 5"]] * len(names))
    finally:
        reward.close()
    verdicts = {name: info["verdict"] for name, info in zip(names, out.info, strict=True)}
    scores = dict(zip(names, out, strict=True))
    assert scores.pop("exit_zero") == 0.5  # ran both tests; passed the correct one only
    assert scores == dict.fromkeys(scores, 0.0), verdicts
    assert verdicts["infinite_loop"] == "timeout"
    assert verdicts["memory_hog"] == "memory"
    assert verdicts["output_flood"] == "output_limit"
    assert verdicts["os_exit_zero"] == "exited_early"
    assert verdicts["exit_in_function"] == "exited_early"
    assert verdicts["kill_parent"] == "failed"
    host_is_healthy()


NON_ROOT_SCRIPT = '''
import json, logging, os, sys
logging.basicConfig()
from reward_models.sandbox import Limits, Sandbox
sb = Sandbox(Limits(wall_seconds=5, cpu_seconds=5))
result = sb.run({"main.py": sys.argv[1]}, sb.python_argv("main.py"))
print(json.dumps({"status": result.status, "stdout": result.stdout, "layers": result.layers}))
'''


def test_without_root_user_namespaces_keep_the_isolation(tmp_path):
    """A scorer that is not root: the namespaces come from a user namespace; the uid layer is reported missing."""
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if world_readable(p)), None)
    if python is None:
        pytest.skip("no world-readable python3 to run an unprivileged scorer with")
    if not world_readable(str(REPO_ROOT / "reward_models" / "__init__.py")):
        pytest.skip(f"the checkout ({REPO_ROOT}) is not readable by an unprivileged user")
    marker = f"/tmp/posttrain-nonroot-{uuid.uuid4().hex}"
    program = textwrap.dedent(f"""
        import os, socket, time
        print("uid", os.getuid())
        try:
            open({marker!r}, "w").write("x"); print("tmp write stays private")
        except OSError:
            pass
        for path in ("/etc/posttrain-x", {str(REPO_ROOT / "posttrain-x")!r}):
            try:
                open(path, "w"); print("WROTE", path)
            except OSError:
                pass
        try:
            socket.create_connection(("127.0.0.1", 22), timeout=1); print("CONNECTED")
        except OSError:
            pass
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(100)
            os._exit(0)
        print("done")
    """)
    before = {p for p in os.listdir("/proc") if p.isdigit()}
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c",
                             NON_ROOT_SCRIPT, program], capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(REPO_ROOT), "HOME": "/nonexistent", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layers"]["unprivileged_user"] != True  # noqa: E712 - a reason string
    assert "sandbox layer unprivileged_user is not in effect" in result.stderr  # said once, in the log
    assert report["layers"]["user_namespace"] is True, report["layers"]
    assert report["status"] == "exited" and "done" in report["stdout"]
    assert "WROTE" not in report["stdout"] and "CONNECTED" not in report["stdout"]
    assert not os.path.exists(marker)
    assert not (REPO_ROOT / "posttrain-x").exists()
    time.sleep(0.2)
    new = {p for p in os.listdir("/proc") if p.isdigit()} - before
    leftovers = []
    for pid in new:
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
        except OSError:
            continue
        if "\nUid:\t65534" in status and "State:\tZ" not in status:
            leftovers.append(pid)
    assert leftovers == []
