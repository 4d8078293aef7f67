"""Dynamic batching: concurrent requests gathered into one forward pass.

The first request to arrive opens a batch; requests that arrive within `max_wait` seconds join it while it holds
at most `max_batch` images, and the batch waits only while another request is on its way (`expecting`: a request
the server is still reading counts), so a lone client is answered at once. A request is never split: one that
would overflow the batch opens the next, and one larger than `max_batch` runs alone. Each batch runs on the
model's one worker thread, so the event loop keeps taking requests while it computes, and the model is never run
by two threads at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np


class Batcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait: float,
                 executor: ThreadPoolExecutor, on_batch: Callable[[int], None] = lambda n: None):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait
        self.executor, self.on_batch = executor, on_batch
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self._held = None  # a request that did not fit the batch before: it opens the next
        self.expected = 0  # requests being read or computed (`expecting`)

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._serve())

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    @contextmanager
    def expecting(self):
        """Around reading a request and submitting it: while it is read, an open batch waits for it."""
        self.expected += 1
        try:
            yield
        finally:
            self.expected -= 1

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """The model's output for the images x (N, C, H, W), computed in a batch with other requests."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    async def _next(self, timeout: float | None):
        if self._held is not None:
            item, self._held = self._held, None
            return item
        if timeout is None:
            return await self.queue.get()
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout <= 0:
                raise TimeoutError from None
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            batch, n = [first], len(first[0])
            deadline = loop.time() + self.max_wait
            while n < self.max_batch:
                if self.queue.empty() and self._held is None and self.expected <= len(batch):
                    break  # no other request is on its way
                try:
                    item = await self._next(max(deadline - loop.time(), 0))
                except TimeoutError:
                    break
                if n + len(item[0]) > self.max_batch:
                    self._held = item
                    break
                batch.append(item)
                n += len(item[0])
            batch = [(x, f) for x, f in batch if not f.done()]  # a client that went away is not computed for
            if not batch:
                continue
            x = batch[0][0] if len(batch) == 1 else np.concatenate([x for x, _ in batch])
            try:
                out = await loop.run_in_executor(self.executor, self._run, x)
            except Exception as e:  # the model's own error goes to every request of the batch
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.on_batch(len(x))
            start = 0
            for xs, f in batch:
                if not f.done():
                    f.set_result(out[start:start + len(xs)])
                start += len(xs)

    def _run(self, x: np.ndarray) -> np.ndarray:
        """The model on x, at most max_batch images per forward."""
        if len(x) <= self.max_batch:
            return self.run(x)
        return np.concatenate([self.run(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)])
