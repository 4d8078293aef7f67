"""cnnctl's terminal output, for the CLI and the Python API alike: the consoles (one writer to standard output,
no control characters from user text), Python warnings as one line, and the training progress (bars at a
terminal or in a notebook, one line per epoch elsewhere)."""

from __future__ import annotations

import contextlib
import io
import os
import sys

from rich.console import Console, RenderHook
from rich.file_proxy import FileProxy
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.segment import Segment
from rich.text import Text

from .callbacks import Callback


# paths and messages never break mid-line; markup is off, so user text (paths, names, class names) prints as it
# is: styles are given as rich Text objects, never as [tags] inside strings
def _real_stdout():
    """The file that sys.stdout stands for. While a live display runs, rich replaces sys.stdout with a proxy that
    prints to a console; cnnctl's console writes through _Stdout, so writing to the proxy would go round for ever
    (console -> _Stdout -> proxy -> console). The proxy is looked through to the file it wraps."""
    f = sys.stdout
    while isinstance(f, FileProxy):
        f = f.rich_proxied_file
    return f


class _Stdout:
    """stdout for everything cnnctl prints, the one writer to fd 1: once the reader is gone (`cnnctl train ... |
    head -5`), the rest of the output is dropped (fd 1 then points at /dev/null, so the exit flush is quiet too)
    and the work goes on: a training run finishes and records its results as if nothing had happened."""

    gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                _real_stdout().write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                _real_stdout().flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        _Stdout.gone = True
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, _real_stdout().fileno())
            os.close(devnull)

    def isatty(self) -> bool:
        return not self.gone and _real_stdout().isatty()

    def fileno(self) -> int:
        return _real_stdout().fileno()

    @property
    def encoding(self) -> str:
        return getattr(_real_stdout(), "encoding", None) or "utf-8"


stdout = _Stdout()
out = Console(file=stdout, highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

# control characters in user text (class names from a config, a folder or a checkpoint; file names) never reach
# the terminal: an escape sequence could retitle the window, hide output or move the cursor
_CONTROLS = dict.fromkeys([*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)], "\ufffd")


def printable(text: str) -> str:
    """text with every control character but newline and tab shown as U+FFFD."""
    return text.translate(_CONTROLS)


class _Printable:
    def __init__(self, inner):
        self.inner = inner

    def __rich_console__(self, console, options):
        for seg in console.render(self.inner, options):
            yield seg if seg.control else Segment(printable(seg.text), seg.style)


class _NoControls(RenderHook):
    def process_renderables(self, renderables):
        return [_Printable(r) for r in renderables]


for _console in (out, err):
    _console.push_render_hook(_NoControls())

def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as cnnctl prints them: one `warning:` line on stderr, never a file name and source line
    (numpy's floating-point RuntimeWarnings are counted by the trainer, not shown; outside it, each once)."""
    text = str(message)
    if issubclass(category, RuntimeWarning):
        if text in _shown:
            return
        _shown.add(text)
        text = f"numpy: {text}"
    err.print(Text.assemble(("warning: ", "bold yellow"), text))


_shown: set[str] = set()


def fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if pct else f"{v:.4f}"


class RichProgress(Callback):
    """An epoch bar and a batch bar with running loss, accuracy, images/s and ETA."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )
        self.epoch_task = self.batch_task = None
        self.downloads: dict[str, int] = {}

    def on_download(self, name, done, total):
        if name not in self.downloads:
            self.progress.start()
            self.downloads[name] = self.progress.add_task(f"download {name}", total=total, stats="")
        self.progress.update(self.downloads[name], completed=done, stats=f"{done / 1e6:.1f} MB")

    def on_train_start(self, info):
        for task in self.downloads.values():
            self.progress.remove_task(task)
        self.progress.stop()
        _print_start(self.console, info)
        self.progress.start()

    def on_epoch_start(self, epoch, epochs, n_batches, start):
        if self.epoch_task is None:
            self.epoch_task = self.progress.add_task("epochs", total=epochs, completed=epoch - 1, stats="")
        if self.batch_task is not None:
            self.progress.remove_task(self.batch_task)
        self.batch_task = self.progress.add_task(f"epoch {epoch}", total=n_batches, completed=start, stats="")

    def on_batch_end(self, batch, loss, acc, ips):
        self.progress.update(self.batch_task, completed=batch,
                             stats=f"loss {loss:.4f} acc {100 * acc:.2f}% {ips:,.0f} img/s")

    def on_epoch_end(self, row):
        self.progress.advance(self.epoch_task)
        self.progress.console.print(_epoch_line(row), soft_wrap=True)

    def close(self):
        self.progress.stop()


class PlainProgress(Callback):
    """One line per epoch, for logs and pipes."""

    def __init__(self, console: Console):
        self.console = console

    def on_download(self, name, done, total):
        if total is not None and done == total:
            self.console.print(f"downloaded {name} ({total / 1e6:.1f} MB)")

    def on_train_start(self, info):
        _print_start(self.console, info)

    def on_epoch_end(self, row):
        self.console.print(_epoch_line(row), soft_wrap=True)

    def close(self):
        pass


class Silent(Callback):
    """No output: the MPI ranks other than 0."""

    def close(self):
        pass


def _print_start(console, info):
    console.print(f"data: train {info['train']:,}  val {info['val']:,}  test {info['test']:,}  "
                  f"image {tuple(info['image_shape'])}  {len(info['classes'])} classes: "
                  f"{', '.join(info['classes'])}", soft_wrap=True)
    console.print(f"model: {info['params']:,} parameters")
    console.print(f"run: {info['run_dir']}")
    if info.get("ranks"):
        ranks = info["ranks"]
        console.print(f"MPI: {len(ranks)} ranks, global batch split across them: " + ", ".join(
            f"rank {r['rank']} pid {r['pid']} on {r['host']}" for r in ranks), soft_wrap=True)
    if info.get("resumed_at"):
        console.print(f"resumed after epoch {info['resumed_at'][0]}, step {info['resumed_at'][1]}")
    init = info.get("init_from")
    if init:
        n = len(init["copied"]) + len(init["fresh"])
        renamed = f" ({init['renamed']} tensors renamed by model.init_from.rename)" if init.get("renamed") else ""
        unused = f"; {len(init['unused'])} tensors of the file unused" if init["unused"] else ""
        console.print(f"initialised from {init['checkpoint']}{renamed}: copied {len(init['copied'])} of {n} parameters "
                      f"and buffers{unused}")
        for f in init["fresh"]:
            console.print(f"  fresh: {f['name']} ({f['reason']})")
        for name in init["unused"][:10]:
            console.print(f"  unused: {name} (no parameter or buffer of the model has its name)")
        if len(init["unused"]) > 10:
            console.print(f"  ... and {len(init['unused']) - 10} more unused (summary.json lists them all)")


def _epoch_line(row):
    return (f"epoch {row['epoch']:>3}  train loss {fmt(row['train_loss'])} acc {fmt(row['train_acc'], True)}  "
            f"val loss {fmt(row['val_loss'])} acc {fmt(row['val_acc'], True)}  lr {row['lr']:.4g}  "
            f"{row['seconds']:.1f}s")


def live(console: Console = out) -> Callback:
    """Progress bars in a terminal or a Jupyter notebook, plain lines elsewhere."""
    return RichProgress(console) if console.is_terminal or console.is_jupyter else PlainProgress(console)
