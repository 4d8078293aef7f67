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
            in_tiles(self.activation.elementwise, part, part, d)


NONE = Epilogue()

TILE = 1 << 16  # values an element-wise function runs on at a time: its temporaries stay in the core's cache


def in_tiles(fn, x: np.ndarray, y: np.ndarray, d: np.ndarray) -> None:
    """fn(x, y, d) (an element-wise function: f(x) into y, f'(x) into d) a tile of TILE values at a time, so that
    its passes over the values and its temporaries run in cache rather than each streaming the whole array
    through memory (GELU's dozen passes 1.8x faster on 2 million values); the same values as one call, whatever
    the tiles. Arrays that do not lie in memory in one order are given to fn whole."""
    if x.size <= TILE:
        fn(x, y, d)
        return
    flat = [a.ravel(order="K") for a in (x, y, d)]
    if not all(np.may_share_memory(f, a) for f, a in zip(flat, (x, y, d))) or \
            len({tuple(np.argsort(a.strides, kind="stable")) for a in (x, y, d)}) > 1:
        fn(x, y, d)  # a copy would not write back, or the three would not run over the same values in step
        return
    fx, fy, fd = flat
    for lo in range(0, fx.size, TILE):
        fn(fx[lo : lo + TILE], fy[lo : lo + TILE], fd[lo : lo + TILE])


def chain(dy: np.ndarray, d: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
    """The gradient before the epilogue's function: dy * d (dy itself without one)."""
    if d is None:
        if out is not None:
            out[...] = dy
        return dy if out is None else out
    return np.multiply(dy, d, out=out, dtype=dy.dtype)
