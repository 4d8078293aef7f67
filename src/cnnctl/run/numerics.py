"""numpy's floating-point warnings while a run trains, counted and named when it diverges, the check that ends a
run whose metric is NaN or infinite, and the hint for a validation accuracy at chance beside a high training one."""

from __future__ import annotations

import collections
import math
import warnings
from pathlib import Path

from cnnctl.errors import CnnctlError, CnnctlWarning, TrainingError


class NumericWarnings:
    """numpy's floating-point RuntimeWarnings (overflow, invalid value, division by zero) while a run trains, from
    every thread: counted, never printed raw. A run that then diverges names them in its error, as the first
    sign of where the numbers left float32's range."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> NumericWarnings:
        self._saved = warnings.catch_warnings()
        self._saved.__enter__()
        warnings.simplefilter("always", RuntimeWarning)
        shown = warnings.showwarning

        def count(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, RuntimeWarning):
                self.counts[f"{message} ({Path(filename).name}:{lineno})"] += 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = count
        return self

    def __exit__(self, *exc) -> None:
        self._saved.__exit__(*exc)

    def explain(self, error: CnnctlError) -> None:
        """Add what numpy warned of to a divergence's message."""
        if self.counts:
            seen = "; ".join(f"{what} x{n}" for what, n in self.counts.most_common(3))
            error.message = f"{error.message}; before it numpy warned of: {seen}"
            error.args = (error.message,)


def check_finite(what: str, value: float, when: str, lr: float) -> None:
    """A metric that is NaN or infinite ends the run with a TrainingError before anything records it."""
    if not math.isfinite(value):
        raise TrainingError(f"the {what} became {value} {when}; training stopped, the checkpoints already written "
                            "are untouched",
                            f"lower optimizer.lr (now {lr:g}), or look for extreme values in the data "
                            "(cnnctl data CONFIG shows each split)")


def batchnorm_hint(model, row: dict, classes: int | None) -> bool:
    """A `warning:` line (True) when an epoch's training accuracy is high while its validation accuracy is near
    chance in a model with batchnorm: the running statistics evaluation normalises with are far from the batch
    statistics training uses (a fine-tuned network whose batchnorm saw other data, most often). `classes` None: a
    multi-label run, whose accuracy (every label right) has no chance level of 1 / classes: no hint."""
    if classes is None:
        return False
    from cnnctl.core.nn.regularization import _BatchNorm

    chance = 1 / max(classes, 1)  # high: 60% of the way from chance to 100%; near chance: within 10% of it
    if row["train_acc"] < chance + 0.6 * (1 - chance) or row["val_acc"] > chance + 0.1 * (1 - chance):
        return False
    if not any(isinstance(layer, _BatchNorm) for _, layer in model.named_layers()):
        return False
    warnings.warn(CnnctlWarning(
        f"epoch {row['epoch']}: training accuracy {100 * row['train_acc']:.1f}% but validation accuracy "
        f"{100 * row['val_acc']:.1f}%, near chance ({100 * chance:.1f}%): batchnorm's running statistics, which "
        "evaluation normalises with, are far from the batch statistics training uses. Freeze the batchnorm layers "
        "(trainable: false: training then normalises with the running statistics too, as fine-tuning a network "
        "whose batchnorm saw other data wants), or let the running statistics catch up (a larger batchnorm "
        "momentum, e.g. 0.1, or more epochs); and check that validation images are prepared as training ones are"),
        stacklevel=2)
    return True
