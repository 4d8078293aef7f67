"""One training step, the same for `cnnctl train`, `cnnctl bench` and `cnnctl lr-find`: forward through the
execution plan, the loss, its gradient (scaled to the global batch under MPI), backward, the gradients summed
over the ranks, clipped (train.grad_clip_norm), the optimizer's update and the weight average's."""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from cnnctl.core.allocator import keep_freed_memory

from . import distributed


def clip_gradients(params, max_norm: float) -> None:
    """Scale the gradients of `params` (nn.Param) so that their global L2 norm is at most max_norm
    (torch.nn.utils.clip_grad_norm_)."""
    params = list(params)
    total = math.sqrt(sum(float(np.vdot(p.grad, p.grad)) for p in params))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in params:
            p.layer.grads[p.key] = p.grad * p.grad.dtype.type(coef)


def correct_count(out: np.ndarray, y: np.ndarray) -> int:
    """The images of a batch answered right: the top output is the class; multi-label (y (N, labels) 0/1): every
    label decided right, its logit above 0 exactly where the image has it (scikit-learn's subset accuracy)."""
    if y.ndim == 2:
        return int(((out > 0) == (y > 0)).all(axis=1).sum())
    return int((out.argmax(axis=1) == y).sum())


class StepResult(NamedTuple):
    """What one step gives: the global batch's loss, this rank's outputs, the global batch's correct answers, and
    the stop requests (SIGINT, SIGTERM) of all ranks (one small reduction carries all of it)."""

    loss: float
    out: np.ndarray
    correct: int
    stop: int | None


class TrainingStep:
    """`step(x, y)` trains on one batch (this rank's share of it under MPI) and returns a StepResult. `stop_request`
    (a callable giving this rank's pending signal or None) is reduced with the loss, so that every rank learns of a
    stop after the same step. A loss that is not finite updates nothing: the caller sees it in the result. The
    process keeps the memory a step frees for the next (cnnctl.core.allocator), as a CLI verb's threads do."""

    def __init__(self, runner, loss_fn, optimizer, world: distributed.World | None = None,
                 grad_clip_norm: float | None = None, average=None,
                 stop_request: Callable[[], int | None] | None = None):
        keep_freed_memory()
        self.runner, self.loss_fn, self.optimizer = runner, loss_fn, optimizer
        self.world = world or distributed.World()
        self.grad_clip_norm, self.average = grad_clip_norm, average
        self.stop_request = stop_request or (lambda: None)
        self.reduce_gradients = distributed.GradientReducer(self.world)

    def _reduce(self, loss: float, out: np.ndarray, y: np.ndarray) -> tuple[float, float, int, int | None]:
        """The global batch's loss, this share's factor for its loss gradient, the correct count and the stop
        request of any rank (SIGTERM before SIGINT)."""
        correct, stop = correct_count(out, y), self.stop_request()
        if self.world.size == 1:
            return loss, 1.0, correct, stop
        loss, share, (correct, interrupts, terms) = distributed.reduce_loss(
            self.world, loss, self.loss_fn.normalizer, correct, stop == signal.SIGINT, stop == signal.SIGTERM)
        stop = stop if stop is not None else signal.SIGTERM if terms else signal.SIGINT if interrupts else None
        return loss, share, int(correct), stop

    def __call__(self, x: np.ndarray, y: np.ndarray, clock: np.ndarray | None = None,
                 step_number: int | None = None) -> StepResult:
        model = self.runner.model
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging loss is caught just below
            out = self.runner.forward(x, training=True, clock=clock)
            loss = float(self.loss_fn.forward(out, y))
        loss, share, correct, stop = self._reduce(loss, out, y)
        if not math.isfinite(loss):
            return StepResult(loss, out, correct, stop)
        grad = self.loss_fn.backward()
        if self.world.size > 1:  # this share's gradient, normalised as the whole batch's
            grad *= grad.dtype.type(share)
        self.runner.backward(grad, clock=clock)
        if self.world.size > 1:
            self.reduce_gradients(model.trainable_parameters())
        if self.grad_clip_norm:
            clip_gradients(model.trainable_parameters(), self.grad_clip_norm)
        self.optimizer.step()
        if self.average is not None:
            self.average.update(self.optimizer.steps if step_number is None else step_number)
        return StepResult(loss, out, correct, stop)
