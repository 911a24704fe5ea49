"""The process's and the machine's memory, as Linux reports it (`/proc`); None or 0 where it is not known."""

from __future__ import annotations

import os
from pathlib import Path


def proc_bytes(path: str, key: str) -> int | None:
    """A `key: N kB` line of a `/proc` file, in bytes; None where the file or the line is missing."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int:
    """The machine's available memory in bytes (MemAvailable), or its physical memory where that is not known."""
    found = proc_bytes("/proc/meminfo", "MemAvailable")
    return found if found is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS), 0 where it is not known."""
    return proc_bytes("/proc/self/status", "VmRSS") or 0


def peak_resident_bytes() -> int | None:
    """This process's peak resident memory since it started or since `reset_peak` (VmHWM); None where not known."""
    return proc_bytes("/proc/self/status", "VmHWM")


def reset_peak() -> bool:
    """Start the peak (VmHWM) again from the resident memory now (Linux `clear_refs` 5); False where that cannot be done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
