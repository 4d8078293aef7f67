"""The one check that refuses, before allocating, what this machine's memory cannot hold."""

from __future__ import annotations

import functools
import os

from .errors import CnnctlError


@functools.cache
def physical_bytes() -> int:
    """This machine's memory (8 GB when the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**33


def refuse_over(what: str, needed: int, share: int, error: type[CnnctlError], fix: str) -> None:
    """Raise `error` when `needed` bytes exceed 1/share of this machine's memory, naming both sizes."""
    budget = physical_bytes() // share
    if needed > budget:
        raise error(f"{what} would take {needed / 1e9:,.1f} GB, more than this machine can spare "
                    f"({budget / 1e9:,.1f} GB)", fix)
