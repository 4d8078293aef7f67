"""Weight averaging: an exponential moving average of a model's parameters and buffers, kept beside the
weights the optimizer updates, and evaluated and saved in their place (train.ema_decay).

After optimizer step t the average moves towards the model: avg = d * avg + (1 - d) * weights, with
d = min(decay, (1 + t) / (10 + t)), so that the first steps, whose weights are far from where training ends,
fade quickly (TensorFlow's ExponentialMovingAverage with num_updates; Keras' use_ema and timm's ModelEma keep
the same kind of average). Buffers (batchnorm running statistics) are averaged too, so the averaged network
is evaluated with statistics of its own kind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from .nn import Layer


def decay_at(decay: float, step: int) -> float:
    """The weight of the old average after optimizer step `step` (1-based)."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    def __init__(self, model: Layer, decay: float):
        self.model, self.decay = model, float(decay)
        self.reset()

    def reset(self) -> None:
        """Start the average at the model's current weights (a new run, or one resumed from a checkpoint)."""
        self.average = {name: np.array(value, copy=True) for name, value in self.model.state_dict().items()}

    def update(self, step: int) -> None:
        """Fold the model's current weights in, after optimizer step `step`."""
        d = decay_at(self.decay, step)
        for name, value in self.model.state_dict().items():
            avg = self.average[name]
            if avg.dtype.kind == "f":
                avg *= avg.dtype.type(d)
                avg += avg.dtype.type(1 - d) * value
            else:
                avg[...] = value

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; after it, its own again, unchanged."""
        own = self.model.state_dict()  # the arrays themselves: load_state_dict installs copies, not into them
        self.model.load_state_dict(self.average)
        try:
            yield
        finally:
            self.model.load_state_dict(own)
