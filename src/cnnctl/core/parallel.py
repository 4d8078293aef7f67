"""cnnctl's own threads: BLAS runs single-threaded and the big array operations are split into slices that a
small pool of threads takes one at a time.

Why not BLAS's threads: OpenBLAS splits every product statically between its threads and spins until all
have finished, so on a busy machine (another training beside it, a browser) one descheduled thread stalls
every call for a time slice; a training step makes hundreds of small products. Here the work of one
operation is cut into a few slices per thread, taken from a shared queue: a thread that is descheduled
delays the slice it holds while the others take the rest, and NumPy releases the GIL inside its kernels.

Every slice writes its own part of the output (output rows of a product, channels of an element-wise
pass, a reduction per channel), never a partial sum that another slice adds to; and where an operation is
cut depends on its size only, never on the thread count (one thread runs the same slices in turn): the
numbers are the same bit for bit whatever --threads is.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from cnnctl.errors import CnnctlError

from .allocator import keep_freed_memory

ENV = "CNNCTL_THREADS"
GRAIN = 1 << 18  # numbers per slice at least: smaller slices cost more to hand out than to do
# a product's multiply-adds count this many to a number copied or compared: at 16, LeNet-5 at batch 32 ran slower on
# 2 threads than on 1 (its only cut operation, a 10.8 million multiply-add product, did not pay for the handover);
# at 16 with the grain doubled instead, the ResNets lost 3-5% (batchnorm, pooling and adds of 0.5-1 million numbers
# ran on one thread)
MAC_PER_NUMBER = 32
MAX_SLICES = 16  # more slices than threads: a thread that stalls holds up one slice while the others go on

_threads = 1
_pool: ThreadPoolExecutor | None = None
_blas_limit = None  # threadpoolctl's limiter, kept alive while cnnctl owns the threads
_task = threading.local()  # .inline: this thread runs one of `both`'s two tasks, its operations uncut by threads
A = TypeVar("A")
B = TypeVar("B")


def local_ranks() -> int:
    """How many ranks of this job run on this host (1 outside MPI or when the launcher does not say)."""
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0].split(",")[0].strip()
        if value.isascii() and value.isdigit():
            return max(1, int(value))
    return 1


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve(threads: int | None) -> int:
    """--threads N, else $CNNCTL_THREADS, else the cores this process may use (shared out between the MPI ranks
    on this host when the launcher bound none of them to cores)."""
    if threads is not None:
        if threads < 1:
            raise CnnctlError(f"--threads {threads}: give at least 1", "e.g. --threads 2")
        return threads
    env = os.environ.get(ENV, "").strip()
    if env:
        if not (env.isascii() and env.isdigit()) or int(env) < 1:  # '²' is a digit to isdigit, not to int
            raise CnnctlError(f"{ENV}={env!r} is not a positive whole number", f"e.g. export {ENV}=2, or unset it")
        return int(env)
    cores = available_cores()
    ranks = local_ranks()
    if ranks > 1 and cores == (os.cpu_count() or cores):  # unbound ranks on one host: a share of the cores each
        return max(1, cores // ranks)
    return cores


def use(threads: int) -> int:
    """Run cnnctl's array work on `threads` threads from now on (BLAS itself single-threaded), and keep the memory
    a training step frees for the next one (cnnctl.core.allocator): what a process that trains sets once."""
    global _threads, _pool, _blas_limit
    from threadpoolctl import threadpool_limits

    keep_freed_memory()
    if _blas_limit is None:
        _blas_limit = threadpool_limits(limits=1, user_api="blas")
    if threads != _threads or (threads > 1 and _pool is None):
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="cnnctl") if threads > 1 else None
        _threads = threads
    return threads


def threads() -> int:
    """The thread count array work uses now (1 until `use` is called)."""
    return _threads


def slices(n: int, size: int) -> list[int]:
    """Where an operation over n items and about `size` numbers is cut: the bounds of its slices, an even number of
    them where there are several (3 slices on 2 threads keep one thread idle a third of the time)."""
    k = max(1, min(n, MAX_SLICES, size // GRAIN))
    if 1 < k < n and k % 2:
        k += 1
    return [n * i // k for i in range(k + 1)]


def split(n: int, work: Callable[[int, int], object], size: int) -> None:
    """Call work(lo, hi) over the slices of range(n) (cut by `slices`) on the pool's threads and this one.
    `work` must write disjoint outputs for disjoint slices; NumPy's floating-point error settings carry over."""
    _drain(slices(n, size), work)


def _drain(bounds: list[int], work: Callable[[int, int], object]) -> None:
    """work(bounds[i], bounds[i + 1]) for every i, each slice taken by the next thread free."""
    k = len(bounds) - 1
    if _threads <= 1 or k == 1 or _pool is None or getattr(_task, "inline", False):
        for i in range(k):
            work(bounds[i], bounds[i + 1])
        return
    queue = iter(range(k))  # next() on it is atomic: each slice is taken once
    errstate = np.geterr()

    def drain():
        with np.errstate(**errstate):
            for i in queue:
                work(bounds[i], bounds[i + 1])

    helpers = [_pool.submit(drain) for _ in range(min(_threads, k) - 1)]
    drain()
    for h in helpers:
        h.result()


def uncut(size: int) -> bool:
    """Whether an operation of about `size` numbers runs as one slice, whatever it is cut over (`slices` and
    `column_parts` cut nothing below two grains)."""
    return size // GRAIN < 2


def both(first: Callable[[], A], second: Callable[[], B]) -> tuple[A, B]:
    """(first(), second()), first on a pool thread while this one runs second: two independent pieces of work too
    small to be cut into slices (a convolution's weight gradient and input gradient at a small batch), each
    running its own operations on its own thread as it would alone. The same bits as one after the other."""
    if _threads <= 1 or _pool is None or getattr(_task, "inline", False):
        return first(), second()
    errstate = np.geterr()

    def alone(work: Callable):
        _task.inline = True
        try:
            with np.errstate(**errstate):
                return work()
        finally:
            _task.inline = False

    helper = _pool.submit(alone, first)
    try:
        b = alone(second)
    finally:
        a = helper.result()
    return a, b


def column_parts(n: int, size: int, cols: int) -> int:
    """Into how many parts the `cols` output columns of each of n products are cut, the products together an
    operation of `size` numbers: 1 when there are as many products as `slices` would make; else enough parts for
    a piece per slice at least, an even number of pieces (the 7 output rows of a 7x7 map, one product each, kept
    one of 2 threads idle for a seventh of the time)."""
    k = max(1, min(MAX_SLICES, size // GRAIN))
    if n >= k:
        return 1
    parts = -(-k // n)  # a piece per slice at least
    if n * parts % 2:
        parts += 1  # an even number of pieces, as `slices` makes
    return max(1, min(cols, parts))


def split_products(n: int, cols: int, size: int, work: Callable[[slice, slice], object]) -> None:
    """work(products, columns) over n products along a leading axis, each with `cols` output columns, together an
    operation of `size` numbers: slices of whole products as `split` cuts them, or, with fewer products than
    slices, each product's columns in `column_parts` parts, one piece at a time. The pieces follow from the shapes
    alone, never from the thread count: the same bits on any."""
    parts = column_parts(n, size, cols)
    if parts == 1:
        split(n, lambda lo, hi: work(slice(lo, hi), slice(None)), size)
        return

    def piece(i: int, _: int) -> None:
        r, q = divmod(i, parts)
        work(slice(r, r + 1), slice(cols * q // parts, cols * (q + 1) // parts))

    _drain(list(range(n * parts + 1)), piece)


def channels(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Channels lo:hi of an (N, C, ...) array (features lo:hi of an (N, F) one)."""
    return a[:, lo:hi] if a.ndim > 1 else a[lo:hi]


def per_channel(like: np.ndarray, work: Callable[[int, int], object]) -> None:
    """split over the channel axis (axis 1) of arrays shaped like `like`, for element-wise passes."""
    split(like.shape[1] if like.ndim > 1 else like.shape[0], work, like.size)


PRODUCT_GRAIN = 1 << 25  # multiply-adds of a slice of one matrix product at least, and 16 rows: each slice is a
# BLAS call that packs its operands again; a dense layer's 134 million multiply-adds (4096 -> 256 at batch 128) ran
# 1.8x faster in 2-4 slices than whole on 2 threads, 1.6x in 16; 6 million (LeNet-5's 400 -> 120) ran slower cut at all


def per_product(rows: int, work: Callable[[int, int], object], macs: int) -> None:
    """split over the rows of one matrix product of `macs` multiply-adds (each slice a single-threaded product)."""
    split(rows, work, min(macs // PRODUCT_GRAIN, rows // 16) * GRAIN)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b (same shape), into a new array laid out as a, a slice of channels per thread."""
    out = np.empty_like(a)
    per_channel(a, lambda lo, hi: np.add(channels(a, lo, hi), channels(b, lo, hi), out=channels(out, lo, hi)))
    return out


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[r] = a @ b[r] (or a[r] @ b[r] when a is stacked too) for every r of the leading axis, in slices
    of r (or pieces of b[r]'s columns, `split_products`): single-threaded products, as NumPy's own loop's."""
    stacked = a.ndim == b.ndim
    split_products(b.shape[0], b.shape[-1], out.size * a.shape[-1] // MAC_PER_NUMBER,
                   lambda r, c: np.matmul(a[r] if stacked else a, b[r][..., c], out=out[r][..., c]))
    return out
