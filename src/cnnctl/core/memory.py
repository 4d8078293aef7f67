"""The one check that refuses, before allocating, what this process's memory cannot hold: the machine's memory,
the process's address-space limit (ulimit -v, RLIMIT_AS) and its cgroup's memory limit (containers, Slurm),
whichever is tightest."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from cnnctl.errors import CnnctlError


@functools.cache
def physical_bytes() -> int:
    """This machine's memory (8 GB when the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**33


def _number(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except (OSError, ValueError):
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _address_space_left() -> int | None:
    """What RLIMIT_AS leaves this process beyond the address space it has mapped already (None: no limit)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft < 0:
            return None
        mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError, IndexError):
        return None
    return max(soft - mapped, 0)


def _cgroup_left() -> int | None:
    """What this process's cgroup memory limit leaves beyond its current use (v2, else v1; None: no limit)."""
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap = _number(limit)
        if cap is not None and cap < 2**60:  # v1 writes a huge number for "no limit"
            return max(cap - (_number(used) or 0), 0)
    return None


def budget() -> tuple[int, str]:
    """The bytes this process may still allocate, and what sets that bound, in words."""
    found = [(physical_bytes(), "this machine's memory")]
    left = _address_space_left()
    if left is not None:
        found.append((left, "the address space left under this process's limit (ulimit -v)"))
    left = _cgroup_left()
    if left is not None:
        found.append((left, "the memory left under this process's cgroup limit"))
    return min(found)


def refuse_over(what: str, needed: int, share: int, error: type[CnnctlError], fix: str) -> None:
    """Raise `error` when `needed` bytes exceed 1/share of the tightest bound of budget(), naming both sizes."""
    total, bound = budget()
    spare = total // share
    if needed > spare:
        raise error(f"{what} would take {needed / 1e9:,.1f} GB, more than can be spared ({spare / 1e9:,.1f} GB "
                    f"of {bound})", fix)
