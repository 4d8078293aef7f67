"""One exception family for everything a user can get wrong; the CLI formats it once and exits 2.

Library code raises these with what went wrong (naming the key, file or layer) and, where there is one,
a fix. Any other exception is a bug in cnnctl and keeps its traceback.
"""

from __future__ import annotations

import signal
from pathlib import Path


class CnnctlError(Exception):
    """A user-facing error: a message, an optional fix, and the process exit code."""

    exit_code = 2
    # met by every MPI rank at the same point (so rank 0 alone reports it and no rank needs to end the others)
    collective = False

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class ConfigError(CnnctlError):
    """The YAML spec or a --set override is invalid."""


class ShapeError(CnnctlError):
    """A layer cannot accept the shape that reaches it."""


class DataError(CnnctlError):
    """A dataset file is missing, corrupt, or does not fit the model."""


class CheckpointError(CnnctlError):
    """A checkpoint is missing, corrupt, not cnnctl's, or for another architecture."""


class TrainingError(CnnctlError):
    """Training could not go on (for example the loss became NaN)."""

    exit_code = 1
    collective = True  # the loss is reduced over the ranks before it is checked


class Interrupted(CnnctlError):
    """SIGINT or SIGTERM stopped training at a batch boundary, after last.safetensors was written."""

    def __init__(self, signum: int, run_dir: Path, epoch: int, step: int):
        last = Path(run_dir) / "checkpoints" / "last.safetensors"
        super().__init__(f"{signal.Signals(signum).name}: stopped at epoch {epoch}, step {step}; saved {last}",
                         f"resume with: cnnctl train --resume {run_dir}")
        self.exit_code = 128 + signum
        self.run_dir = run_dir


class CnnctlWarning(UserWarning):
    """Something the user should know that does not stop the work (an autotune cache that cannot be read, say):
    the CLI prints it as one `warning:` line."""
