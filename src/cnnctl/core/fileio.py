"""Writing files so that nothing is lost: every file cnnctl writes (checkpoints, run records, sweeps, exports,
schemas) goes through atomic_write_bytes."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from pathlib import Path

from cnnctl.errors import CnnctlError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def special_kind(path: Path) -> str | None:
    """What stands at path when it is neither a regular file nor missing: "folder", "device", "FIFO" or "socket"
    (symlinks followed); None for a regular file or nothing."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    for test, kind in ((stat.S_ISDIR, "folder"), (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return None


class Unreadable(Exception):
    """A file that read_regular would not or could not read, with the reason in words; `missing` when nothing is
    at the path."""

    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.reason, self.missing = reason, missing


def read_regular(path: Path, limit: int, follow_links: bool = True) -> bytes:
    """The bytes of the regular file at path, at most `limit` of them. Anything else at the path (a folder, a
    device such as /dev/zero, a FIFO, which is never waited on, a socket; with follow_links false, a symlink), a
    larger file, and every OS error of the path (missing, no permission, a link loop, a name too long, a NUL
    byte) raise Unreadable with the reason."""
    try:
        kind = special_kind(Path(path)) if follow_links or not os.path.islink(path) else "symlink"
        if kind is not None:
            raise Unreadable(f"it is a {kind}, not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW))
    except FileNotFoundError:
        raise Unreadable("no such file", missing=True) from None
    except (OSError, ValueError) as e:
        raise Unreadable(getattr(e, "strerror", None) or str(e)) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # replaced in between
            raise Unreadable("it is not a regular file")
        if info.st_size > limit:
            raise Unreadable(f"it is {info.st_size:,} bytes, more than the {limit:,} allowed")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise Unreadable(e.strerror or str(e)) from None
    if len(data) > limit:
        raise Unreadable(f"it is more than the {limit:,} bytes allowed")
    return data


class NotWritable(CnnctlError):
    """A folder or a socket where a file is to be written; `kind` says which."""

    def __init__(self, path: Path, kind: str):
        super().__init__(f"cannot write {path}: it is a {kind}", "give the name of a file to write")
        self.kind = kind


def output_target(path: Path, follow_links: bool = True) -> tuple[Path, bool]:
    """Where a write to path lands, and whether in place: a symlink is followed and a device or a FIFO is written
    in place (True), anything else replaced (False); a folder or a socket raises NotWritable. With follow_links
    false the path itself is replaced, whatever stands there but a folder. An OS error of the path (a link loop,
    a NUL byte) raises OSError or ValueError."""
    path = Path(path)
    if follow_links:
        target = Path(os.path.realpath(path))  # a link's target: what `>` writes to
        kind = special_kind(target)
    else:  # cnnctl's own files: whatever stands there is replaced (a link as a link), but a folder
        target = path
        kind = "folder" if not path.is_symlink() and special_kind(path) == "folder" else None
    if kind in ("folder", "socket"):
        raise NotWritable(path, kind)
    return target, kind is not None


def atomic_write_bytes(path: Path, data: bytes, follow_links: bool = True) -> None:
    """Write data to path, and lose nothing if that fails.

    A regular file (or nothing) at the path is replaced atomically: a temporary file beside it, fsync, rename. A
    symlink is followed: the file it points to is replaced the same way and the link stays. A device or a FIFO is
    written in place, as any Unix tool writes to one (/dev/null stays a device; a FIFO's reader gets the bytes),
    never replaced. A folder or a socket is refused. With follow_links false (cnnctl's own cache files) whatever
    is at the path but a folder is replaced atomically, a symlink as a link. An OS refusal (no permission, a full
    disk, a link loop) is a CnnctlError naming the path, and leaves nothing behind."""
    path = Path(path)
    tmp = None
    try:
        target, in_place = output_target(path, follow_links)
        if in_place:  # a device or a FIFO: opened for writing as it is
            with open(target, "wb", buffering=0) as f:
                f.write(data)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; every file cnnctl writes follows the user's umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, ValueError)):  # ValueError: a NUL byte in the path
            reason = getattr(e, "strerror", None) or str(e)
            raise CnnctlError(f"cannot write {path}: {reason}",
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
