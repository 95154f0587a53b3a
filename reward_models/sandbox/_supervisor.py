"""Sandbox supervisor: run one untrusted program isolated and limited, then report how it ended.

Started by ``reward_models.sandbox.runner`` as ``python -I -S _supervisor.py CONFIG``, where CONFIG
is the hex of a ``marshal``-ed dict, with the config's ``report_fd`` open for the report. Standard
library only (it runs in isolated mode), and no ``json``: its import costs more than the rest.

Steps (each layer is tried; one that fails is reported and the others still apply):
  1. die with the caller (PR_SET_PDEATHSIG);
  2. new pid, network and mount namespaces (unshare(2)); as root directly, otherwise inside a new
     user namespace when the kernel permits unprivileged ones;
  3. fork the program's process, which becomes pid 1 of the new pid namespace, so when it
     exits or is killed the kernel kills every process left in the namespace (daemons,
     setsid escapees, fork bombs) before this supervisor's wait returns;
  4. in the child: private mounts; every existing mount remounted read-only; home directories
     covered by empty tmpfs; fresh tmpfs for the work directory, /tmp, /var/tmp and /dev/shm;
     a fresh /proc showing only the sandbox; the interpreter's directory made reachable for the
     unprivileged user; rlimits; a new session; an unprivileged uid/gid with no supplementary
     groups (without root: a nested user namespace, so the program holds no capability over
     the namespaces set up for it) and no_new_privs; then exec;
  5. in the supervisor: a wall-clock alarm that kills the program; SIGTERM from the caller
     (output limit) does the same; without a pid namespace, every process of the sandbox uid
     (or, without a uid, of the program's process group) is killed after the program ends, and,
     without a mount namespace, files it left in /tmp, /var/tmp and /dev/shm are deleted.

The report is lines of Python literals: ``{"setup": {...}}`` from the child just before exec,
then ``{"exit": {...}}`` from the supervisor once nothing of the program is left.
"""

import ctypes
import marshal
import os
import resource
import signal
import stat
import sys
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
_KEEP_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
               "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
REPORT_FD = -1  # set from the config

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)


def _fail(what):
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _bytes(text):
    return None if text is None else text.encode()


def mount(source, target, fstype, flags, data=None):
    if libc.mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data)) != 0:
        _fail(f"mount {target}")


def prctl(option, value):
    if libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        _fail(f"prctl {option}")


def write_report(kind, payload):
    os.write(REPORT_FD, (repr({kind: payload}) + "\n").encode())


def _unescape(path):
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def read_mounts():
    """(mount point, flags to keep) of every mount, parents first."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            keep = 0
            for opt in fields[5].split(","):
                keep |= _KEEP_FLAGS.get(opt, 0)
            mounts.append((_unescape(fields[4]), keep))
    return mounts


def hidden_ancestor(path):
    """The top-most ancestor of ``path`` that others may not traverse (mode without o+x), or None."""
    parts = os.path.abspath(path).split("/")
    for i in range(2, len(parts) + 1):
        ancestor = "/".join(parts[:i])
        try:
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                return ancestor
        except OSError:
            return None
    return None


def _under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def setup_filesystem(cfg, layers):
    """Read-only view of the host with private directories hidden, a private tmpfs work dir, fresh /proc."""
    workdir, uid, gid = cfg["workdir"], cfg["uid"], cfg["gid"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    files = {}
    for name in os.listdir(workdir):
        with open(os.path.join(workdir, name), "rb") as f:
            files[name] = f.read()
    # Directories to cover with an empty tmpfs: home directories (tokens, keys, caches), and any
    # directory the sandbox user cannot enter that holds the interpreter. Paths the program needs
    # (the interpreter) are kept through a handle opened now and bound back after the cover.
    covers = {p for p in cfg["hide"] if os.path.isdir(p) and not os.path.islink(p)}
    if uid is not None:
        covers |= {top for top in map(hidden_ancestor, cfg["reach"]) if top}
    covers = {c for c in covers if not any(o != c and _under(c, o) for o in covers) and c != "/"}
    keep = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in cfg["reach"]
            if any(_under(path, c) for c in covers)]

    failed = []
    for point, flags in read_mounts():
        try:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError as err:
            failed.append(f"{point} ({err.strerror})")
    layers["readonly_fs"] = True if not failed else f"not read-only: {', '.join(failed[:3])}"

    for top in sorted(covers):
        mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path, fd in keep:
        os.makedirs(path, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    for top in sorted(covers):
        if _under(workdir, top):
            os.makedirs(workdir, exist_ok=True)
        mount(None, top, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    layers["hidden_homes"] = True

    small = "size=16m,mode=1777"
    for point in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(point):
            mount("tmpfs", point, "tmpfs", MS_NOSUID | MS_NODEV, small)
    os.makedirs(workdir, exist_ok=True)  # inside the new /tmp when the work dir lives there
    owner = f",uid={uid},gid={gid}" if uid is not None else ""
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['limits']['tmpfs_bytes']},mode=0700{owner}")
    for name, data in files.items():
        path = os.path.join(workdir, name)
        with open(path, "wb") as f:
            f.write(data)
        if uid is not None:
            os.chown(path, uid, gid)
    layers["private_workdir"] = True
    if layers.get("pid_namespace") is True:
        # rw: a nested user namespace writes its maps there; /proc/sys needs real root anyway
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def set_limits(limits):
    cpu = int(limits["cpu_seconds"] + 0.999)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_child(cfg, layers):
    """In the forked child: isolate, limit, drop privileges, exec the program. Never returns."""
    for sig in (signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()  # own session and process group: kill(0, ...) reaches only the sandbox
    if layers.get("mount_namespace") is True:
        try:
            setup_filesystem(cfg, layers)
        except OSError as err:
            layers["private_workdir"] = f"failed: {err}"
    if layers.get("private_workdir") is not True and cfg["uid"] is not None:
        hidden = [p for p in cfg["reach"] if hidden_ancestor(p)]
        if hidden:
            raise OSError(f"the interpreter's directory {hidden[0]!r} is not readable by other users and, "
                          "without a mount namespace, cannot be made readable for the sandbox user; "
                          "give the sandbox a world-readable interpreter (python=...)")
        if hidden_ancestor(os.path.dirname(cfg["workdir"])):
            raise OSError(f"the work directory's parent {os.path.dirname(cfg['workdir'])!r} is not "
                          "traversable by other users; without a mount namespace the sandbox user needs it "
                          "(choose a base_dir like /tmp)")
    set_limits(cfg["limits"])
    layers["rlimits"] = True
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        layers["unprivileged_user"] = True
    elif layers.get("user_namespace") is True:
        shed_capabilities()
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    layers["no_new_privs"] = True
    write_report("setup", layers)
    os.chdir(cfg["workdir"])
    os.closerange(3, REPORT_FD)  # the report fd itself is close-on-exec: open until exec succeeds
    os.closerange(REPORT_FD + 1, 65536)
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])


def live_processes(uid):
    """Pids of processes of ``uid`` that are not zombies (dead, waiting to be reaped by their parent)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def kill_user(uid):
    """Kill every process running as ``uid`` (a helper becomes the uid and signals -1), until none lives."""
    for _ in range(40):
        helper = os.fork()
        if helper == 0:
            try:
                os.setresuid(uid, uid, uid)
                for _ in range(3):  # again, for processes forked while the first signal went out
                    os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
            os._exit(0)
        os.waitpid(helper, 0)
        if not live_processes(uid):
            return
        time.sleep(0.05)


def enter_user_namespace(flags, inside=0, outside=None):
    """unshare(CLONE_NEWUSER | flags) and map uid/gid ``inside`` to our own; True or the reason it failed."""
    uid = os.geteuid() if outside is None else outside
    gid = os.getegid() if outside is None else outside
    if libc.unshare(CLONE_NEWUSER | flags) != 0:
        return f"unavailable: unprivileged user namespaces are not permitted ({os.strerror(ctypes.get_errno())})"
    for name, text in (("setgroups", "deny"), ("uid_map", f"{inside} {uid} 1"), ("gid_map", f"{inside} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return True


def shed_capabilities():
    """Without root, the program would be root of our user namespace, able to undo the mounts. It is
    moved into a nested user namespace as uid 1000 instead: no capability over anything we set up."""
    state = enter_user_namespace(0, inside=1000, outside=0)
    if state is not True:
        raise OSError(state)
    os.setresgid(1000, 1000, 1000)
    os.setresuid(1000, 1000, 1000)


def remove_user_files(uid):
    """Without a private /tmp, delete what the sandbox user left in the world-writable temp dirs."""
    import shutil

    for top in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def main():
    global REPORT_FD
    cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
    REPORT_FD = cfg["report_fd"]
    os.set_inheritable(REPORT_FD, False)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != cfg["parent_pid"]:  # the caller died before we set the signal
        return 1
    layers = {}
    names = (("pid_namespace", CLONE_NEWPID), ("net_namespace", CLONE_NEWNET), ("mount_namespace", CLONE_NEWNS))
    if not cfg["namespaces"]:
        layers.update((name, "disabled") for name, _ in names)
    elif os.geteuid() == 0:
        for name, flag in names:
            layers[name] = True if libc.unshare(flag) == 0 else f"unavailable: {os.strerror(ctypes.get_errno())}"
    else:
        state = enter_user_namespace(CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS)
        layers["user_namespace"] = state
        layers.update((name, state) for name, _ in names)
    if cfg["uid"] is None:
        layers["unprivileged_user"] = "unavailable: not running as root"

    state = {"child": 0, "killed_by": None}

    def stop(reason):
        if state["killed_by"] is None:
            state["killed_by"] = reason
        if state["child"]:
            try:
                os.kill(state["child"], signal.SIGKILL)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, lambda *_: stop("caller"))
    signal.signal(signal.SIGALRM, lambda *_: stop("wall"))
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            run_child(cfg, layers)
        except BaseException as err:  # noqa: BLE001 - reported; the run is then a sandbox error
            try:
                write_report("setup_error", f"{type(err).__name__}: {err}")
            finally:
                os._exit(125)
    state["child"] = pid
    if state["killed_by"] is not None:  # a signal arrived before the fork returned
        stop(state["killed_by"])
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the caller's EOF on stdout/stderr must depend on the sandbox alone
        os.dup2(devnull, fd)
    signal.setitimer(signal.ITIMER_REAL, cfg["limits"]["wall_seconds"])
    while True:
        try:
            _, status, usage = os.wait4(pid, 0)
            break
        except ChildProcessError:
            status, usage = 0, None
            break
    signal.setitimer(signal.ITIMER_REAL, 0)
    wall = time.monotonic() - start
    if layers.get("pid_namespace") is not True:
        if cfg["uid"] is not None:
            kill_user(cfg["uid"])
            if layers.get("mount_namespace") is not True:
                remove_user_files(cfg["uid"])
        else:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    write_report("exit", {
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "killed_by": state["killed_by"],
        "wall_seconds": wall,
        "cpu_seconds": (usage.ru_utime + usage.ru_stime) if usage else 0.0,
        "max_rss_kb": usage.ru_maxrss if usage else 0,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
