"""The typer CLI: parse, call the library, print. Errors from the library are formatted in one place
(`common.guarded`). One module per family of verbs; importing a module registers its verbs (typer's app is the
verb registry: `cnnctl --help`, the README's verb table and docs/verbs.md are checked against it), in this order."""

# isort: off
from . import train  # noqa: F401  train, eval, bench, inspect
from . import runs  # noqa: F401  runs, plot, report
from . import data  # noqa: F401  data, schema
from . import model  # noqa: F401  viz, explain, predict
from . import interop  # noqa: F401  export, import
from . import diagnose  # noqa: F401  gradcheck, lr-find
from . import sweep  # noqa: F401  sweep
from . import serve  # noqa: F401  serve
# isort: on
from .common import app

__all__ = ["app"]
