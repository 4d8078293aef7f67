"""Verified downloads: fetch a dataset's files into its cache folder, politely and atomically.

Each file is checked against SHA-256 digests kept here, of the file as served or of its gzip-decompressed
bytes (re-packed copies of the same data pass too). Bytes go to `NAME.part`, resumed with an HTTP Range
request after a dropped connection, and only a verified file is renamed to its real name, so an interrupted
download never leaves a file that passes for complete. Failures say which files to place where by hand.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cnnctl.errors import DataError
from cnnctl.version import __version__

Progress = Callable[[str, int, int | None], None]  # (file name, bytes done, total bytes or None)


@dataclass(frozen=True)
class Remote:
    name: str
    urls: tuple[str, ...]
    sha256: frozenset[str]  # accepted digests of the file, or of its decompressed content
    extract: tuple[str, ...] = field(default=())  # members to unpack from a .tar.gz (cifar10)


def _idx(base_urls: tuple[str, ...], digests: dict[str, tuple[str, ...]]) -> list[Remote]:
    return [Remote(name, tuple(u + name for u in base_urls), frozenset(d)) for name, d in digests.items()]


REMOTES: dict[str, list[Remote]] = {
    "mnist": _idx(
        ("https://storage.googleapis.com/cvdf-datasets/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        {
            "train-images-idx3-ubyte.gz": ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                                           "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
            "train-labels-idx1-ubyte.gz": ("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                                           "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
            "t10k-images-idx3-ubyte.gz": ("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                                          "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
            "t10k-labels-idx1-ubyte.gz": ("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                                          "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        },
    ),
    "fashion_mnist": _idx(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",),
            "train-labels-idx1-ubyte.gz": ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",),
            "t10k-images-idx3-ubyte.gz": ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",),
            "t10k-labels-idx1-ubyte.gz": ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",),
        },
    ),
    "kmnist": _idx(
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        {
            "train-images-idx3-ubyte.gz": ("51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",),
            "train-labels-idx1-ubyte.gz": ("e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",),
            "t10k-images-idx3-ubyte.gz": ("edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",),
            "t10k-labels-idx1-ubyte.gz": ("20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",),
        },
    ),
    "cifar10": [Remote(
        "cifar-10-binary.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
        frozenset({"c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"}),
        extract=tuple(f"cifar-10-batches-bin/{n}" for n in
                      [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin", "batches.meta.txt"]),
    )],
}


def digests(path: Path) -> set[str]:
    """SHA-256 of the file, and of its decompressed content when it is gzip."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        magic = f.read(2)
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    out = {h.hexdigest()}
    if magic == b"\x1f\x8b":
        try:
            inner = hashlib.sha256()
            with gzip.open(path, "rb") as g:
                for chunk in iter(lambda: g.read(1 << 20), b""):
                    inner.update(chunk)
            out.add(inner.hexdigest())
        except (OSError, EOFError):
            pass
    return out


def verified(path: Path, remote: Remote) -> bool:
    return path.is_file() and bool(digests(path) & remote.sha256)


def _by_hand(remote: Remote, dest: Path) -> str:
    return f"download {remote.urls[0]} yourself and place it at {dest / remote.name}"


def fetch(remote: Remote, dest: Path, progress: Progress | None = None, mirror: str | None = None,
          retries: int = 3, backoff: float = 1.0, timeout: float = 30.0) -> Path:
    """Download one file into dest (resuming NAME.part), verify it, then rename it into place."""
    dest.mkdir(parents=True, exist_ok=True)
    target, part = dest / remote.name, dest / (remote.name + ".part")
    if verified(target, remote):
        return target
    urls = (mirror.rstrip("/") + "/" + remote.name,) if mirror else remote.urls
    problem = "no attempt made"
    for attempt in range(retries):
        for url in urls:
            try:
                _download(url, part, remote.name, progress, timeout)
            except (urllib.error.URLError, OSError, ValueError) as e:  # network trouble: retry, resuming
                problem = f"{url}: {getattr(e, 'reason', e)}"
                continue
            got = digests(part)
            if got & remote.sha256:
                os.replace(part, target)
                return target
            part.unlink()  # complete but wrong: never resume from it
            raise DataError(
                f"{remote.name} from {url} does not match its SHA-256 checksum (got {min(got)[:16]}..., expected "
                f"{' or '.join(d[:16] + '...' for d in sorted(remote.sha256))})",
                _by_hand(remote, dest),
            )
        if attempt + 1 < retries:
            time.sleep(backoff * 2**attempt)
    raise DataError(f"could not download {remote.name} after {retries} attempts ({problem})",
                    f"check the network or data.mirror, or {_by_hand(remote, dest)}")


def _download(url: str, part: Path, name: str, progress: Progress | None, timeout: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"cnnctl/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        if offset and resp.status != 206:  # the server ignored the range: start over
            offset = 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        done = offset
        with open(part, "ab" if offset else "wb") as f:
            for chunk in iter(lambda: resp.read(1 << 16), b""):
                f.write(chunk)
                done += len(chunk)
                if progress:
                    progress(name, done, total)
            f.flush()
            os.fsync(f.fileno())
        if total is not None and done < total:
            raise OSError(f"connection closed after {done} of {total} bytes")


def _extract(archive: Path, remote: Remote, dest: Path) -> None:
    """Unpack the listed regular files only (never links or paths outside dest), each atomically."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in remote.extract:
            info = tar.getmember(member)
            if not info.isfile():
                raise DataError(f"{archive}: {member} is not a regular file", _by_hand(remote, dest))
            out = dest / member
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".part")
            with tar.extractfile(info) as src, open(tmp, "wb") as f:  # type: ignore[union-attr]
                f.write(src.read())
            os.replace(tmp, out)


def ensure(dataset: str, dest: Path, progress: Progress | None = None, mirror: str | None = None,
           backoff: float = 1.0) -> None:
    """Make sure every file of a downloadable dataset is in dest, fetching and verifying what is missing."""
    def present(remote: Remote) -> bool:
        if remote.extract:
            return all((dest / m).is_file() for m in remote.extract)
        return verified(dest / remote.name, remote) or (
            remote.name.endswith(".gz") and (dest / remote.name[:-3]).is_file())  # uncompressed copy

    for remote in REMOTES[dataset]:
        if present(remote):
            continue
        try:
            path = fetch(remote, dest, progress, mirror, backoff=backoff)
        except DataError as e:
            missing = [r for r in REMOTES[dataset] if not present(r)]
            listing = "; ".join(f"{r.urls[0]} -> {dest / r.name}" for r in missing)
            raise DataError(e.message, f"check the network or data.mirror, or place these files by hand: {listing}") \
                from None
        if remote.extract:
            _extract(path, remote, dest)
