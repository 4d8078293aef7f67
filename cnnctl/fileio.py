"""Writing files so that nothing is lost: every file cnnctl writes (checkpoints, run records, sweeps, exports,
schemas) goes through atomic_write_bytes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import CnnctlError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path atomically: a temporary file beside it, fsync, rename. An OS refusal (a folder in the
    way, no permission, a full disk) is a CnnctlError naming the path, and leaves nothing behind."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; every file cnnctl writes follows the user's umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CnnctlError(f"cannot write {path}: {e.strerror or e}",
                              "write to a writable folder with free space, to a file name (not a folder)") from None
        raise
