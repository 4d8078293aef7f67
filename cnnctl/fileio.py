"""Writing files so that nothing is lost: every file cnnctl writes (checkpoints, run records, sweeps, exports,
schemas) goes through atomic_write_bytes."""

from __future__ import annotations

import json
import math
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


def finite_or_none(obj):
    """obj with every non-finite float (NaN, inf) replaced by None, through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = None) -> str:
    """Strict JSON (RFC 8259) of obj: a non-finite number is written as null, never as a bare NaN or Infinity
    token that strict readers reject."""
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)
