"""Batches prepared ahead: a background thread draws the next batch (its rows gathered, augmented, normalised)
while the current training or evaluation step runs. NumPy releases the interpreter's lock in its array work, so
the two overlap; the numbers are those of the plain iterator, since the batches are drawn in the same order from
the same generator.

A checkpoint in the middle of an epoch must record the augmentation generator as it was before the first batch
not yet trained on, not as the thread has left it (a batch ahead): `rewound()` pauses the thread and sets the
generator to that state for the checkpoint's duration."""

from __future__ import annotations

import copy
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_END = object()


class Prefetched:
    """Iterate `batches` one batch ahead in a thread; `rng` (when given) is the generator the batches draw
    from, whose state `rewound` restores. Use as a context manager: leaving it stops the thread."""

    def __init__(self, batches: Iterator, rng: np.random.Generator | None = None, ahead: int = 1):
        self.batches, self.rng, self.ahead = batches, rng, ahead
        self._ready: deque = deque()  # (rng state before the batch, batch) or (None, _END) or (None, exception)
        self._cond = threading.Condition()
        self._busy = self._paused = self._stop = False
        self._thread = threading.Thread(target=self._work, name="cnnctl-prefetch", daemon=True)

    def __enter__(self) -> Prefetched:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _state(self):
        return None if self.rng is None else copy.deepcopy(self.rng.bit_generator.state)

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or (not self._paused and len(self._ready) < self.ahead))
                if self._stop:
                    return
                self._busy = True
            state = self._state()
            try:
                item = next(self.batches)
            except StopIteration:
                item = _END
            except BaseException as e:  # raised where the batch is consumed
                item = e
            with self._cond:
                self._busy = False
                self._ready.append((state, item))
                self._cond.notify_all()
                if item is _END or isinstance(item, BaseException):
                    return

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self):
        with self._cond:
            self._cond.wait_for(lambda: self._ready)
            _, item = self._ready[0]
            if item is _END:
                raise StopIteration
            self._ready.popleft()
            self._cond.notify_all()
        if isinstance(item, BaseException):
            raise item
        return item

    @contextmanager
    def rewound(self):
        """While inside: the thread paused, and `rng` in its state before the first batch not yet taken (for a
        checkpoint); after: the thread goes on from where it was."""
        with self._cond:
            self._paused = True
            self._cond.wait_for(lambda: not self._busy)
            before = self._ready[0][0] if self._ready and self._ready[0][0] is not None else None
        ahead = self._state()
        try:
            if before is not None:
                self.rng.bit_generator.state = before
            yield
        finally:
            if before is not None:
                self.rng.bit_generator.state = ahead
            with self._cond:
                self._paused = False
                self._cond.notify_all()


@contextmanager
def prefetched(batches: Iterator, rng: np.random.Generator | None = None, on: bool = True):
    """The batches prepared a batch ahead in a thread (`Prefetched`), or with `on` false drawn as they are asked
    for (`Plain`, which has nothing to rewind); either way a context yielding the iterable."""
    if not on:
        yield Plain(batches)
        return
    with Prefetched(batches, rng) as feed:
        yield feed


class Plain:
    """Batches drawn when asked for."""

    def __init__(self, batches: Iterator):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    @contextmanager
    def rewound(self):
        yield
