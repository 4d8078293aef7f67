"""Data-parallel training over MPI: `mpiexec -n N cnnctl train CONFIG` runs N ranks, each holding the whole model
and training on its share of every global batch (data.batch_size images, cut into N equal parts).

What keeps N ranks the one model a single process would train:
- every rank draws the same global batch (same seed, same shuffle and augmentation streams) and takes rows
  [N_b * rank / N, N_b * (rank + 1) / N) of it, so the data order does not depend on N;
- the loss gradient of each share is scaled to the global batch's normaliser (its size, or its summed class
  weights), so summing the ranks' parameter gradients (one Allreduce over one flat buffer a step) gives the
  gradient of the global batch;
- batchnorm sums its per-channel statistics over the ranks (sum and sum of squares in one reduction forward,
  the two gradient sums in one reduction backward): SyncBatchNorm. `train.sync_batchnorm: false` keeps them
  per rank (ghost batchnorm: faster, another model);
- dropout draws its mask for the global batch and keeps its share of it.

Outside MPI everything here is the identity: `World` is one process and mpi4py is never imported.
No pickle: every message is a NumPy buffer (mpi4py's upper-case methods).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time

import numpy as np

from cnnctl.errors import ConfigError
from cnnctl.extras import require

# Variables the launchers set in each rank's environment: MPICH's hydra and Intel MPI (PMI), Open MPI,
# Slurm's srun (set for a job step only, not in the batch script around it)
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
HOST_BYTES = 256


def launched_size() -> int:
    """How many ranks the launcher started, from its environment variables (1 outside MPI)."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isascii() and value.isdigit():
            return max(1, int(value))
    return 1


class World:
    """One process: every collective is the identity. The base of MPIWorld, with the same methods."""

    rank, size = 0, 1

    def __init__(self) -> None:
        self.host = socket.gethostname()
        self.reduce_seconds = 0.0  # time spent in reductions (Allreduce) since the last reset
        self.reductions = 0

    @property
    def root(self) -> bool:
        """Rank 0 writes the run directory and prints progress."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's rows [lo, hi) of a batch of n."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def sum(self, a: np.ndarray) -> np.ndarray:
        """a summed over the ranks, in place (a contiguous array); every rank gets the same result."""
        return a

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (every rank gets the same answer)."""
        return bool(flag)

    def broadcast(self, a: np.ndarray) -> np.ndarray:
        """Rank 0's a, in place on every rank (a contiguous array of the same shape everywhere)."""
        return a

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's bytes on every rank (the others pass None)."""
        assert data is not None
        return data

    def ranks(self) -> list[dict]:
        """Each rank's host and process id, in rank order."""
        return [{"rank": 0, "host": self.host, "pid": os.getpid()}]

    def abort(self, code: int) -> None:
        """End every rank now (a failure on one rank must not leave the others waiting in a reduction)."""
        sys.exit(code)

    def label(self) -> str:
        """'rank R of N on HOST', for messages."""
        return f"rank {self.rank} of {self.size} on {self.host}"


class MPIWorld(World):
    """N ranks of an MPI job (mpi4py's COMM_WORLD)."""

    def __init__(self, comm, mpi) -> None:
        super().__init__()
        self.comm, self.MPI = comm, mpi
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def sum(self, a):
        t0 = time.perf_counter()
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        self.reduce_seconds += time.perf_counter() - t0
        self.reductions += 1
        return a

    def any(self, flag):
        buf = np.array([1 if flag else 0], np.int32)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.MAX)
        return bool(buf[0])

    def broadcast(self, a):
        self.comm.Bcast(a, root=0)
        return a

    def broadcast_bytes(self, data):
        n = np.array([len(data) if self.root else 0], np.int64)
        self.comm.Bcast(n, root=0)
        buf = np.frombuffer(data, np.uint8).copy() if self.root else np.empty(int(n[0]), np.uint8)
        self.comm.Bcast(buf, root=0)
        return buf.tobytes()

    def ranks(self):
        mine = np.zeros(HOST_BYTES + 8, np.uint8)
        host = self.host.encode()[:HOST_BYTES]
        mine[: len(host)] = np.frombuffer(host, np.uint8)
        mine[HOST_BYTES:] = np.frombuffer(np.int64(os.getpid()).tobytes(), np.uint8)
        everyone = np.empty((self.size, HOST_BYTES + 8), np.uint8)
        self.comm.Allgather(mine, everyone)
        return [{"rank": r, "host": bytes(row[:HOST_BYTES]).rstrip(b"\0").decode(errors="replace"),
                 "pid": int(np.frombuffer(row[HOST_BYTES:].tobytes(), np.int64)[0])} for r, row in enumerate(everyone)]

    def abort(self, code):
        sys.stdout.flush()
        sys.stderr.flush()
        # MPI_Abort ends every process at once, mpiexec's forwarders too: output still in their pipes is lost (seen:
        # a rank's error message gone, under load). A moment first lets them pass on what this rank wrote.
        time.sleep(ABORT_GRACE)
        self.comm.Abort(code)


ABORT_GRACE = 0.5  # seconds between a rank's last words and MPI_Abort

_world: World | None = None


def current() -> World | None:
    """The world, if world() has made it (None before: error handling must not start MPI)."""
    return _world


def world() -> World:
    """The world this process belongs to: MPI's when a launcher started more than one rank, else one process.
    mpi4py is imported (and MPI initialised) only in the first case."""
    global _world
    if _world is None:
        n = launched_size()
        if n <= 1:
            _world = World()
        else:
            MPI = require("mpi4py.MPI", "mpi", f"started as one of {n} MPI ranks, but mpi4py is not installed "
                          "(the mpi extra: mpi4py and MPICH)", instead="or run without mpiexec")
            _world = MPIWorld(MPI.COMM_WORLD, MPI)
    return _world


class GradientReducer:
    """Sums the trainable parameters' gradients over the ranks with one Allreduce over one flat float32 buffer
    (allocated once per set of parameters); the layers' gradients become views of the summed buffer."""

    def __init__(self, world: World):
        self.world = world
        self._buffer: np.ndarray | None = None
        self._layout: tuple | None = None

    def __call__(self, params) -> None:
        params = list(params)
        layout = tuple((p.name, p.grad.shape) for p in params)
        if layout != self._layout:  # first step, or the trainable set changed (unfreezing)
            self._layout = layout
            self._buffer = np.empty(sum(int(np.prod(s)) for _, s in layout), np.float32)
        buf, at = self._buffer, 0
        for p in params:
            n = p.grad.size
            buf[at : at + n] = p.grad.ravel()
            at += n
        self.world.sum(buf)
        at = 0
        for p in params:
            n = p.grad.size
            p.layer.grads[p.key] = buf[at : at + n].reshape(p.grad.shape)
            at += n


def mark_share(world: World, n: int, context) -> tuple[int, int]:
    """This rank's rows (lo, hi) of a global batch of n, recorded in `context` (the runner's nn.Context) for the
    layers that draw for the whole batch (dropout)."""
    lo, hi = world.shard(n)
    context.part = (lo, hi, n)
    return lo, hi


def take_share(world: World, x: np.ndarray, y: np.ndarray, context) -> tuple[np.ndarray, np.ndarray]:
    """This rank's rows of a global batch (x, y), marked in `context` (`mark_share`)."""
    lo, hi = mark_share(world, len(y), context)
    return x[lo:hi], y[lo:hi]


def context_of(world: World, sync_batchnorm: bool):
    """What the layers that ask are told on this rank (an nn.Context): a plan's own (work cut across cnnctl's
    threads), and batchnorm sums its statistics over the ranks (unless sync_batchnorm is false)."""
    import dataclasses

    from cnnctl.core.plan import threaded

    return dataclasses.replace(threaded(), sum=world.sum if world.size > 1 and sync_batchnorm else None)


def reduce_loss(world: World, loss: float, normalizer: float, *extra: float) -> tuple[float, float, np.ndarray]:
    """One reduction over the ranks: the global batch's loss, this share's factor for its loss gradient (its
    normaliser over the global batch's, so that the summed parameter gradients are the global batch's), and the
    sums of the extra numbers."""
    sums = world.sum(np.array([loss * normalizer, normalizer, *extra], np.float64))
    return float(sums[0] / sums[1]), normalizer / float(sums[1]), sums[2:]


def flat_state(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays' bytes end to end (for one broadcast of a whole state)."""
    return np.concatenate([np.ascontiguousarray(a).view(np.uint8).ravel() for a in arrays]) if arrays \
        else np.zeros(0, np.uint8)


def broadcast_state(world: World, arrays: list[np.ndarray]) -> None:
    """Copy rank 0's values of these arrays (the same shapes and dtypes on every rank) into every rank's, in
    place, with one broadcast."""
    if world.size == 1 or not arrays:
        return
    buf = world.broadcast(flat_state(arrays))
    at = 0
    for a in arrays:
        n = a.nbytes
        a[...] = buf[at : at + n].view(a.dtype).reshape(a.shape)
        at += n


def check_batches(batch_size: int, n_train: int | None, size: int) -> None:
    """Every rank must get a share of every global batch: data.batch_size a multiple of the ranks, and the
    epoch's last (smaller) batch no smaller than their number (n_train None: the first check alone)."""
    if batch_size % size:
        lower, higher = batch_size // size * size, -(-batch_size // size) * size
        raise ConfigError(f"data.batch_size {batch_size} is the global batch, cut into {size} equal shares (one per "
                          f"MPI rank), but {batch_size} is not a multiple of {size}",
                          f"--set data.batch_size={higher}" + (f" (or {lower})" if lower else "")
                          + f", or run {math.gcd(batch_size, size)} ranks")
    last = 0 if n_train is None else n_train % batch_size
    if 0 < last < size:
        raise ConfigError(f"the last batch of an epoch holds {last} of the {n_train:,} training images, fewer than "
                          f"the {size} MPI ranks, so some rank would have none",
                          "change data.batch_size or data.val_split a little, or run fewer ranks")


def synchronise(world: World, model, optimizer, average=None) -> None:
    """After an epoch, every rank takes rank 0's weights, buffers and optimizer state (one broadcast): they are
    equal already when the reductions give every rank the same sums; with train.sync_batchnorm false this makes
    the running statistics rank 0's on every rank."""
    if world.size == 1:
        return
    state = {name: np.array(value) for name, value in model.state_dict().items()}
    # by name, never by the order a dict was filled in (a checkpoint's tensors come back in another order on each
    # rank): the broadcast copies arrays by position
    optim = optimizer.state
    arrays = [*state.values(), *(optim[name][k] for name in sorted(optim) for k in sorted(optim[name]))]
    if average:
        arrays += [average.average[name] for name in sorted(average.average)]
    broadcast_state(world, arrays)
    model.load_state_dict(state)
