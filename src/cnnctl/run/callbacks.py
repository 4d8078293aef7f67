"""Training callbacks: the hooks the trainer calls as a run goes (progress bars, loggers, a sweep's scheduler)."""

from __future__ import annotations


class Callback:
    """Progress hooks; the CLI subclasses this to draw bars. Every hook is optional."""

    def on_train_start(self, info: dict) -> None: ...

    def on_epoch_start(self, epoch: int, epochs: int, n_batches: int, start: int) -> None: ...

    def on_batch_end(self, batch: int, loss: float, acc: float, images_per_second: float) -> None: ...

    def on_epoch_end(self, row: dict) -> None: ...

    def on_step(self, step: int, lr: float, loss: float) -> None:
        """After each optimizer step: the step count, the rate it used and the batch's loss."""

    def on_train_end(self, summary: dict) -> None:
        """After a run finished, with what summary.json holds."""

    def on_download(self, name: str, done: int, total: int | None) -> None: ...

    def should_stop(self, row: dict) -> bool:
        """Asked after each epoch: True ends training there (a sweep scheduler's early stop)."""
        return False


class Callbacks(Callback):
    """Several callbacks as one: every hook goes to each, in order; training stops if any asks."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = callbacks

    def _each(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_train_start(self, info):
        self._each("on_train_start", info)

    def on_epoch_start(self, epoch, epochs, n_batches, start):
        self._each("on_epoch_start", epoch, epochs, n_batches, start)

    def on_batch_end(self, batch, loss, acc, images_per_second):
        self._each("on_batch_end", batch, loss, acc, images_per_second)

    def on_step(self, step, lr, loss):
        self._each("on_step", step, lr, loss)

    def on_epoch_end(self, row):
        self._each("on_epoch_end", row)

    def on_download(self, name, done, total):
        self._each("on_download", name, done, total)

    def on_train_end(self, summary):
        self._each("on_train_end", summary)

    def should_stop(self, row: dict) -> bool:
        return any(cb.should_stop(row) for cb in self.callbacks)

