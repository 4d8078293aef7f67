"""Weight initialisers, all drawn from a numpy Generator that the caller passes in."""

from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError
from ..memory import refuse_over

INITS = ("he_normal", "he_uniform", "glorot_normal", "glorot_uniform")


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """fan_in and fan_out of a Dense (out, in) or Conv2D (out, in, kh, kw) weight."""
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def initialize(shape: tuple[int, ...], method: str, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """He (Kaiming, for ReLU-family nets) or Glorot (Xavier) initialisation, normal or uniform. A weight too large
    for this machine is refused before anything is allocated."""
    # drawn in float64; at most a sixteenth of the machine's memory (1.5 GB here)
    refuse_over(f"a weight of shape {tuple(shape)} (while it is drawn)", 8 * math.prod(shape), 16, ShapeError,
                "use fewer filters or units, or a smaller kernel")
    fan_in, fan_out = fans(shape)
    family, dist = method.rsplit("_", 1)
    if family == "he":
        var = 2.0 / fan_in
    elif family == "glorot":
        var = 2.0 / (fan_in + fan_out)
    else:
        raise ValueError(f"unknown initialiser {method!r}; choose one of {', '.join(INITS)}")
    if dist == "normal":
        w = rng.normal(0.0, math.sqrt(var), size=shape)
    elif dist == "uniform":
        bound = math.sqrt(3.0 * var)
        w = rng.uniform(-bound, bound, size=shape)
    else:
        raise ValueError(f"unknown initialiser {method!r}; choose one of {', '.join(INITS)}")
    return w.astype(dtype)
