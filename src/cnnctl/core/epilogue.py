"""The epilogue: what runs on a product's output while that output is in cache, written once for every
convolution algorithm and for a residual unit's add.

    y = f(y + bias),  d = f'(y + bias)

value by value, in place, on whatever slice of the output the caller has just computed (rows of a lowered
product, channels of a Winograd output, a slice of channels of an add). f is any element-wise activation
(cnnctl.nn.activations.Elementwise: its `elementwise(x, y, d)` gives f and its derivative in one call), or none
(the bias alone). Backward multiplies the output's gradient by d (`chain`), which the callers fold into the copy
of the deltas they make anyway.
"""

from __future__ import annotations

import numpy as np


class Epilogue:
    """Bias (when given) then the element-wise function `activation` (when not None)."""

    def __init__(self, activation=None):
        self.activation = activation

    @property
    def name(self) -> str:
        """The activation's tag ('' without one): what the plan lists as fused and the autotune key records."""
        return "" if self.activation is None else self.activation.tag

    def derivative(self, y: np.ndarray) -> np.ndarray | None:
        """The array that receives f' for an output like y (laid out as y), or None without an activation."""
        return None if self.activation is None else self.activation.derivative_like(y)

    def __call__(self, part: np.ndarray, bias: np.ndarray | None = None, d: np.ndarray | None = None) -> None:
        """part += bias, then part = f(part) with f'(part) into d (the same slice of the derivative array)."""
        if bias is not None:
            part += bias
        if self.activation is not None:
            self.activation.elementwise(part, part, d)


NONE = Epilogue()


def chain(dy: np.ndarray, d: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
    """The gradient before the epilogue's function: dy * d (dy itself without one)."""
    if d is None:
        if out is not None:
            out[...] = dy
        return dy if out is None else out
    return np.multiply(dy, d, out=out, dtype=dy.dtype)
