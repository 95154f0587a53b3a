"""Measure the peak extra memory of a code block (weight sync uses it every step).

On CUDA the allocator's own peak counter is exact. On CPU we use the kernel's
resident-set high-water mark: writing ``5`` to ``/proc/self/clear_refs`` resets
``VmHWM`` to the current RSS, so after the block ``VmHWM - RSS_before`` is the
most the process grew during it (an upper bound on what the block allocated,
since other threads count too). Elsewhere the meter reports ``None``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """``with PeakMemory(device) as meter: ...`` then ``meter.peak_extra_bytes`` and ``meter.source``."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.source: str | None = None
        self.peak_extra_bytes: int | None = None
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.source = "cuda_allocator"
            return self
        rss = _status_kib("VmRSS")
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            rss = None
        if rss is not None:
            self._start = rss * 1024
            self.source = "rss_high_water"
        return self

    def __exit__(self, *exc) -> None:
        if self.source == "cuda_allocator":
            torch.cuda.synchronize(self.device)
            self.peak_extra_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        elif self.source == "rss_high_water":
            high = _status_kib("VmHWM")
            self.peak_extra_bytes = None if high is None else max(0, high * 1024 - self._start)
