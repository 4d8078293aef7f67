"""Weight initialisers, all drawn from a numpy Generator that the caller passes in."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from cnnctl.core.memory import refuse_over
from cnnctl.errors import ShapeError

# the initialisers by name: (variance from fan_in and fan_out, distribution); `init:` in a config takes these names
INITS = {
    "he_normal": (lambda fan_in, fan_out: 2.0 / fan_in, "normal"),
    "he_uniform": (lambda fan_in, fan_out: 2.0 / fan_in, "uniform"),
    "glorot_normal": (lambda fan_in, fan_out: 2.0 / (fan_in + fan_out), "normal"),
    "glorot_uniform": (lambda fan_in, fan_out: 2.0 / (fan_in + fan_out), "uniform"),
    # PyTorch's default for Conv2d and Linear weights (kaiming_uniform_, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    "torch_uniform": (lambda fan_in, fan_out: 1.0 / (3.0 * fan_in), "uniform"),
    # identity (Dirac) where the channels allow it, He normal elsewhere: see dirac()
    "dirac": (lambda fan_in, fan_out: 2.0 / fan_in, "normal"),
    # the first convolution from the training data's patch covariance, set once the data is loaded (whitening.py);
    # He normal until then, and for the filters beyond twice the patch size
    "patch_whitening": (lambda fan_in, fan_out: 2.0 / fan_in, "normal"),
}
Init = Literal[tuple(INITS)]  # the spec field type, derived from the table


class _ShapesOnly:
    """Passed as the generator to build a model's shapes without its weights (inspect, memory estimates)."""

    def __repr__(self):
        return "SHAPES_ONLY"


SHAPES_ONLY = _ShapesOnly()


MAX_VALUES = 2**48  # far beyond any machine's memory, and within what NumPy can index


def placeholder(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A read-only array of zeros that holds one number whatever its shape (all strides 0). A shape of more
    values than any machine could hold is refused (by the builder, naming the layer)."""
    if math.prod(shape) > MAX_VALUES:
        raise ShapeError(f"a parameter of shape {tuple(shape)} would hold {math.prod(shape):.3g} values, more than "
                         "any machine can", "use fewer filters or units, less padding, or a smaller input_shape")
    return np.broadcast_to(np.zeros((), dtype), tuple(shape))


def constant(shape: tuple[int, ...], value: float, rng, dtype=np.float32) -> np.ndarray:
    """A parameter or buffer filled with value; with rng=SHAPES_ONLY a placeholder (nothing allocated)."""
    if rng is SHAPES_ONLY:
        return placeholder(shape, dtype)
    return np.full(shape, value, dtype)


def is_placeholder(a: np.ndarray) -> bool:
    return a.ndim > 0 and a.size > 1 and not any(a.strides)


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """fan_in and fan_out of a Dense (out, in) or Conv2D (out, in, kh, kw) weight."""
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def dirac(w: np.ndarray, groups: int = 1) -> np.ndarray:
    """w (out, in/groups, *kernel) with its first min(out, in) filters of every group made the identity (torch's
    nn.init.dirac_ for those: a 1 at the kernel's centre on the matching input channel, 0 elsewhere): the layer
    starts by passing those channels through. The other filters keep their random values (airbench's partial
    identity initialisation)."""
    out_per_group, width = w.shape[0] // groups, w.shape[1]
    o = np.arange(w.shape[0])
    local = o % out_per_group
    identity = o[local < width]
    w[identity] = 0
    w[(identity, local[identity], *(np.full(len(identity), k // 2) for k in w.shape[2:]))] = 1
    return w


def initialize(shape: tuple[int, ...], method: str, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """He (Kaiming, for ReLU-family nets) or Glorot (Xavier) initialisation, normal or uniform. A weight too large
    for this machine is refused before anything is allocated. With rng=SHAPES_ONLY: a placeholder."""
    if rng is SHAPES_ONLY:
        return placeholder(shape, dtype)
    # drawn in float64; at most a sixteenth of the machine's memory (1.5 GB here)
    refuse_over(f"a weight of shape {tuple(shape)} (while it is drawn)", 8 * math.prod(shape), 16, ShapeError,
                "use fewer filters or units, or a smaller kernel")
    if method not in INITS:
        raise ValueError(f"unknown initialiser {method!r}; choose one of {', '.join(INITS)}")
    variance, dist = INITS[method]
    var = variance(*fans(shape))
    if dist == "normal":
        w = rng.normal(0.0, math.sqrt(var), size=shape)
    else:
        bound = math.sqrt(3.0 * var)
        w = rng.uniform(-bound, bound, size=shape)
    return w.astype(dtype)
