"""One training step, the same for `cnnctl train`, `cnnctl bench` and `cnnctl lr-find`: forward through the
execution plan, the loss, its gradient (scaled to the global batch under MPI), backward, the gradients summed
over the ranks, clipped (train.grad_clip_norm), the optimizer's update and the weight average's."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

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


class TrainingStep:
    """`step(x, y)` trains on one batch (this rank's share of it under MPI) and returns (loss, outputs): the loss
    of the global batch. `reduce(loss, outputs, y) -> (loss, share)`, when given, replaces the reduction of the
    loss over the ranks (the trainer's also counts the correct answers and the ranks' stop requests); a loss
    that is not finite is handed to `on_nonfinite` (which may raise) and nothing is updated."""

    def __init__(self, runner, loss_fn, optimizer, world: distributed.World | None = None,
                 grad_clip_norm: float | None = None, average=None,
                 reduce: Callable[[float, np.ndarray, np.ndarray], tuple[float, float]] | None = None):
        self.runner, self.loss_fn, self.optimizer = runner, loss_fn, optimizer
        self.world = world or distributed.World()
        self.grad_clip_norm, self.average = grad_clip_norm, average
        self.reduce = reduce or self._reduce_loss
        self.reduce_gradients = distributed.GradientReducer(self.world)

    def _reduce_loss(self, loss: float, out, y) -> tuple[float, float]:
        if self.world.size == 1:
            return loss, 1.0
        return distributed.reduce_loss(self.world, loss, self.loss_fn.normalizer)[:2]

    def __call__(self, x: np.ndarray, y: np.ndarray, clock: np.ndarray | None = None,
                 on_nonfinite: Callable[[float], object] | None = None, step_number: int | None = None):
        model = self.runner.model
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging loss is caught just below
            out = self.runner.forward(x, training=True, clock=clock)
            loss = float(self.loss_fn.forward(out, y))
        loss, share = self.reduce(loss, out, y)
        if not math.isfinite(loss):
            if on_nonfinite is not None:
                on_nonfinite(loss)
            return loss, out
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
        return loss, out
