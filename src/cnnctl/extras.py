"""The optional extras (pyproject.toml's `[project.optional-dependencies]`): one function imports a module that one
of them brings and, where it is missing, says what needed it and the install line that brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import CnnctlError


def require(module: str, extra: str, message: str, error: type[CnnctlError] = CnnctlError,
            instead: str | None = None) -> ModuleType:
    """Import `module` (dotted), or raise `error`: `message` (what needs it, and that it is not installed) and the
    fix `pip install 'cnnctl[extra]'`, with what works without it (`instead`) after a comma."""
    try:
        parts = module.split(".")
        for k in range(1, len(parts)):  # the packages first: a cached submodule does not hide a missing package
            importlib.import_module(".".join(parts[:k]))
        return importlib.import_module(module)
    except ImportError:
        raise error(message, f"pip install 'cnnctl[{extra}]'" + (f", {instead}" if instead else "")) from None
