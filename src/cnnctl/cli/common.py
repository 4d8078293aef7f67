"""What every verb shares: the typer app, the consoles, --set, and the one place errors are printed."""

from __future__ import annotations

import errno
import functools
import os
import traceback
import warnings
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text
from typer.core import TyperArgument

from cnnctl.core import parallel
from cnnctl.core.fileio import NotWritable, json_text, output_target
from cnnctl.errors import CnnctlError, Interrupted
from cnnctl.run import checkpoint, distributed, loading
from cnnctl.run.console import (  # noqa: F401  (the verbs' names for them)
    _show_warning,
    err,
    fmt,
    out,
    printable,
    stdout,
)
from cnnctl.run.weights import checkpoint_file
from cnnctl.version import __version__

# typer prints an argument's Python type after its metavar ("CHECKPOINT|RUN_DIR <path>", "FILES... <list[Path]>");
# cnnctl's metavars say what to give, so arguments show those alone (options already do when given a metavar)
TyperArgument.display_type_rich = lambda self, ctx: None

# help is plain text (rich_markup_mode=None): square brackets in it, as in cnnctl[plot], stay as written
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Train convolutional networks from one YAML file on a pure NumPy core.")
warnings.showwarning = _show_warning

SetOption = Annotated[list[str], typer.Option("--set", metavar="KEY=VALUE",
                                              help="Override a config key: --set optimizer.lr=0.01 "
                                              "(dotted path, value parsed as YAML); repeatable.")]
TargetArgument = Annotated[Path, typer.Argument(metavar="CONFIG|CHECKPOINT|RUN_DIR")]
CheckpointArgument = Annotated[Path, typer.Argument(metavar="CHECKPOINT|RUN_DIR")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ThreadsOption = Annotated[int | None, typer.Option(
    "--threads", metavar="N", show_default=False,
    help="Threads for the array work (default: $CNNCTL_THREADS, else the cores this process may use); BLAS itself "
    "runs single-threaded. The numbers do not depend on it.")]


def use_threads(threads: int | None) -> int:
    """Resolve --threads / $CNNCTL_THREADS / the usable cores, and run the array work on that many threads."""
    return parallel.use(parallel.resolve(threads))


def guarded(fn):
    """Turn CnnctlError into one readable message and its exit code; Ctrl-C into exit 130.

    Under MPI (several ranks) an error that every rank meets at the same point (a stop requested by a signal, a
    diverging loss) is printed by rank 0 and every rank exits; any other error on one rank is printed with its
    rank and host, and ends every rank at once (MPI_Abort), so that none waits for it in a reduction."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            world = distributed.current()
            if world is None or world.root:
                err.print(Text.assemble(("interrupted: ", "bold yellow"), e.message))
                err.print(f"  {e.hint}")
            raise typer.Exit(e.exit_code) from None
        except CnnctlError as e:
            world = distributed.current()
            many = world is not None and world.size > 1
            if not many or world.root or not e.collective:
                where = f"error ({world.label()}): " if many and not e.collective else "error: "
                # one write: under MPI another rank's abort may end this process at any moment
                fix = (("\n  fix: ", "bold"), e.hint) if e.hint else ()
                err.print(Text.assemble((where, "bold red"), e.message, *fix))
            if many and not e.collective:
                world.abort(e.exit_code)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            world = distributed.current()
            err.print("interrupted" + (f" ({world.label()})" if world and world.size > 1 else ""))
            if world is not None and world.size > 1:
                world.abort(130)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except MemoryError as e:  # past every check made before allocating (they estimate): one message, no traceback
            world = distributed.current()
            many = world is not None and world.size > 1
            err.print(Text.assemble((f"error ({world.label()}): " if many else "error: ", "bold red"),
                                    f"out of memory: {e or 'an allocation failed'}" + ("; ending every rank" if many
                                                                                        else "")))
            err.print(Text.assemble(("  fix: ", "bold"), "lower data.batch_size or data.eval_batch_size, use a "
                                    "smaller model.input_shape, " + ("start fewer ranks on a host, " if many else "") +
                                    "or raise the process's memory limit (ulimit -v)"))
            if many:
                world.abort(2)
            raise typer.Exit(2) from None
        except Exception:
            world = distributed.current()
            if world is None or world.size == 1:
                raise
            err.print(f"error ({world.label()}): an unexpected failure in cnnctl; ending every rank")
            err.print(traceback.format_exc(), end="")
            world.abort(1)

    return wrapper


def _version(value: bool):
    if value:
        out.print(f"cnnctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                           help="Show the version and exit.")] = False):
    """cnnctl: declarative CNN training on NumPy."""


def print_json(obj) -> None:
    """One strict JSON document on stdout (a non-finite number is null)."""
    stdout.write(json_text(obj) + "\n")
    stdout.flush()


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], right: Collection[str] = ()) -> Table:
    """A rich table with these columns (right-justified when named in `right`) and rows of cell strings."""
    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left")
    for row in rows:
        t.add_row(*row)
    return t


def check_writable(path: Path, option: str) -> None:
    """Refuse an output path that cannot be written before any work is done, by the rules of
    fileio.output_target: a file (or nothing, or a symlink to either) needs a folder where a temporary file can
    be made (created when missing, as the writers do); a device or FIFO needs write permission; a folder or a
    socket is refused."""
    path = Path(path)
    try:
        target, in_place = output_target(path)
        if in_place:  # a device or FIFO is written in place
            if not os.access(target, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = target.parent / f".{target.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except NotWritable as e:
        raise CnnctlError(f"{option} {path}: cannot write there, it is a {e.kind}",
                          f"give a file name, e.g. {path / 'out.png'}" if e.kind == "folder" else
                          "give the name of a file") from None
    except (OSError, ValueError) as e:
        raise CnnctlError(f"{option} {path}: cannot write there ({getattr(e, 'strerror', None) or e})",
                          "give a path in a folder you can write to") from None


def checkpoint_of(path: Path) -> Path:
    """A checkpoint file as given, or for a run directory its best checkpoint (else its last), or for a folder
    cnnctl import wrote its model, said on stderr."""
    found, which = checkpoint_file(path)
    if which == "imported":
        err.print(f"using {found} (the model cnnctl import wrote)")
    elif which is not None:
        err.print(f"using {found} ({which} checkpoint of the run)")
    return found


def load_checkpoint(path: Path, overrides: list[str] | None = None) -> tuple[Path, checkpoint.Checkpoint]:
    """checkpoint_of(path) and the checkpoint loaded from it, with --set overrides applied to its config."""
    path = checkpoint_of(path)
    return path, loading.with_overrides(checkpoint.load(path), overrides or [])


def load_target(target: Path, overrides: list[str]) -> loading.Target:
    """The spec, layer rows and recorded algorithms of a config, a checkpoint or a run directory."""
    return loading.load_target(checkpoint_of(target), overrides)
