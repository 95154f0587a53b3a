"""Resource limits of one sandboxed run."""

from __future__ import annotations

from dataclasses import asdict, dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Limits for one program; every one is enforced by the kernel or by the supervisor.

    ``wall_seconds``: wall-clock time, then the whole process tree is killed;
    ``cpu_seconds``: CPU time per process (RLIMIT_CPU; SIGXCPU, then SIGKILL a second later);
    ``memory_bytes``: address space per process (RLIMIT_AS; allocations fail past it);
    ``file_bytes``: size of any file written (RLIMIT_FSIZE);
    ``processes``: processes and threads of the sandbox user (RLIMIT_NPROC: stops fork bombs);
    ``open_files``: file descriptors per process (RLIMIT_NOFILE);
    ``output_bytes``: stdout + stderr captured, then the run is killed (verdict ``output_limit``);
    ``tmpfs_bytes``: size of the private, in-memory work directory (and of its /tmp).
    """

    wall_seconds: float = 10.0
    cpu_seconds: float = 10.0
    memory_bytes: int = 1024 * MiB
    file_bytes: int = 16 * MiB
    processes: int = 32
    open_files: int = 256
    output_bytes: int = 1 * MiB
    tmpfs_bytes: int = 64 * MiB

    def as_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self) -> None:
        for name, value in self.as_dict().items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"sandbox limit {name} must be a positive number, got {value!r}")
