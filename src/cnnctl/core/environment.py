"""What a run's numbers depend on, recorded in summary.json and in every checkpoint."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import numpy as np

from cnnctl.version import __version__

from . import parallel


def blas_info() -> dict:
    """BLAS library, kernel and thread count as threadpoolctl sees them."""
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            return {"threads": pool.get("num_threads"), "library": pool.get("internal_api"),
                    "kernel": pool.get("architecture"), "version": pool.get("version")}
    return {"threads": None}


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """cnnctl, Python and NumPy versions, the BLAS and its threads, cnnctl's threads, the platform, the command."""
    return {"cnnctl": __version__, "cpu": cpu_model(), "python": platform.python_version(), "numpy": np.__version__,
            "blas": blas_info(), "threads": parallel.threads(), "platform": platform.platform(),
            "command": sys.argv}
