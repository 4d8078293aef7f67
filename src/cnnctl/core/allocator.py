"""The C allocator's policy while cnnctl trains: memory a step frees stays in the process for the next step. Set
once per process by `cnnctl.core.parallel.use` (every verb with --threads) and by a training step's construction
(`cnnctl.train` and the other Python entry points too).

A training step allocates its activations, their gradients and temporaries anew and frees them by its end. glibc's
malloc serves arrays above its mmap threshold (128 kB at first, raised as such blocks are freed) with fresh pages
from the kernel and gives the top of its heap back once more than its trim threshold lies free there, so every
step faulted the same pages in again: the CIFAR-size networks of benchmarks/vs_torch.py at batch 128 took
2,500-3,400 page faults and 28-41 ms of kernel CPU time a step, and their steps ran 7-11% faster without
(`python benchmarks/page_faults.py`; docs/performance.md). With arrays up to 32 MB taken from the heap (glibc's
largest mmap threshold) and up to a gigabyte (at most a quarter of the machine's memory) kept free at its top, a
step after the first few takes none. The process's memory stays at its peak until it ends instead of shrinking
between steps.

Other C libraries (musl, macOS) are left as they are; so is a policy the user set (MALLOC_MMAP_THRESHOLD_ or
MALLOC_TRIM_THRESHOLD_ in the environment, glibc's own variables).
"""

from __future__ import annotations

import ctypes
import os
import platform

from .memory import physical_bytes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest glibc takes on 64-bit machines (half its largest heap)
TRIM_THRESHOLD = 1 << 30

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep what a step frees for the next step (once per process); whether it is set."""
    global _kept
    if _kept is None:
        _kept = _set()
    return _kept


def _set() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = min(TRIM_THRESHOLD, physical_bytes() // 4, 2**31 - 1)
    # the mmap threshold first: setting either fixes both, and the trim threshold alone would leave the mmap
    # threshold at 128 kB (every array of the step from fresh pages)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, trim))
