"""Shared memory that vLLM's CPU tensor-parallel shards leave behind when a process is killed.

vLLM CPU (0.32) connects the shards of one engine through POSIX shared memory named after the group alone
(``/dev/shm/-tp:0-[0-1]-cpushm_<rank>`` under ``external_launcher``: no run id in the name) and unlinks it
on a clean exit only. A shard killed mid-run leaves its files, and the next tensor-parallel run on the machine
fails at engine start ("create shm in SHMManager failed. errno: 17"): a resumed run could not start.

``remove_orphaned`` deletes such files that no live process has mapped, so it never touches the memory of a
run still going; the launcher calls it before and after every multi-process run.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

PATTERN = "*-cpushm_*"


def _mapped_paths() -> set[str]:
    """Paths of files mapped by any process whose memory map this user may read."""
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps, errors="replace") as f:
                for line in f:
                    if "cpushm" in line:
                        mapped.add(line.split(maxsplit=5)[-1].strip().removesuffix(" (deleted)"))
        except OSError:  # the process ended, or it is not ours to read
            continue
    return mapped


def remove_orphaned(directory: str | Path = "/dev/shm") -> list[Path]:
    """Delete this user's vLLM CPU shard files in ``directory`` that no live process maps; return them."""
    files = [Path(p) for p in glob.glob(os.path.join(glob.escape(str(directory)), PATTERN))]
    if not files:
        return []
    mapped = _mapped_paths()
    removed = []
    for path in files:
        try:
            if path.stat().st_uid != os.getuid() or str(path) in mapped:
                continue
            path.unlink()
            removed.append(path)
        except OSError:
            continue
    return removed
