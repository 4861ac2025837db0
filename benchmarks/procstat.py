"""This process's memory and its children's, read from /proc and getrusage (Linux).

Shared by the benchmarks that report peak memory: a peak is only meaningful for the window
it covers, so :func:`reset_peak` starts a window (the kernel resets ``VmHWM`` to the
current ``VmRSS``) and :func:`memory_kib` reads ``VmHWM`` at its end.
"""

from __future__ import annotations

import resource
from pathlib import Path


def memory_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Start a new peak-RSS window (``VmHWM`` := ``VmRSS``); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def children_peak_kib() -> int:
    """The largest peak RSS of any terminated, waited-for child (loader workers), KiB."""
    return int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def children_cpu_s() -> float:
    """User + system CPU seconds of the terminated, waited-for children (and theirs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime
