"""The typer CLI: parse, call the library, print. Errors from the library are formatted in one place
(`common.guarded`). One module per group of verbs; importing them registers the commands, in this order."""

# isort: off
from . import train  # noqa: F401  train, eval, bench, inspect
from . import tools  # noqa: F401  runs, plot, viz, data, schema, export, import, report, explain, predict, ...
from . import sweep  # noqa: F401  sweep
# isort: on
from .common import app

__all__ = ["app"]
