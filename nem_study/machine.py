"""What this machine has free: memory and disk space.

Read from ``/proc`` (Linux) and ``shutil.disk_usage``; ``None`` where it cannot be known. The
checks that use them are in ``nem_study.capacity`` (and the archive check of ``nem_study.inputs``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (Linux); empty where it cannot be read."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return info
    except (OSError, ValueError, IndexError):
        return {}


def available_memory() -> int | None:
    """Bytes of memory a new allocation can get without swapping: MemAvailable (Linux), else the
    free physical pages; None if unknown."""
    if "MemAvailable" in (info := _meminfo()):
        return info["MemAvailable"]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path: str | os.PathLike) -> tuple[int, Path]:
    """Free bytes on the file system that ``path`` is (or would be created) on, and the existing
    folder that was measured."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free, p
