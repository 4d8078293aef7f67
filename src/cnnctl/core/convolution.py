"""The convolution algorithms the execution plan chooses between, each a registered object:

    applies(conv, input_shape)     whether it can run this (ungrouped) convolution on inputs of this (C, H, W) shape
    forward(conv, x, epilogue, keep, scratch) -> (y, saved)    y = epilogue(conv(x) + bias), what backward reads
    backward(conv, dy, saved, x_shape, scratch) -> (dx or None, dweight, dbias)
    saved_bytes(conv, input_shape, out_shape, batch, itemsize)    what forward keeps for backward
    describe()                     one line for `cnnctl inspect --plan` and the docs

`conv` is a convolution layer (its kernel_size, stride, dilation, groups, pads(), params, needs_input_grad);
the epilogue (cnnctl.epilogue) is the bias and any element-wise activation, fused on the output. A new
algorithm is one class here with `@register("name")`; the checkpoint's list of recorded algorithms and the
plan's candidates come from `ALGORITHMS`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from cnnctl.errors import CnnctlError
from cnnctl.registry import registrar

from . import functional as F
from . import parallel, winograd
from .epilogue import Epilogue, chain

ALGORITHMS: dict[str, type[Algorithm]] = {}
register = registrar(ALGORITHMS)


class Algorithm:
    """One way to compute a convolution's forward and backward passes (see the module's docstring)."""

    tag: ClassVar[str]
    description: ClassVar[str]

    def applies(self, conv, input_shape) -> bool:
        return conv.groups == 1

    def forward(self, conv, x, epilogue: Epilogue, keep: dict | F.Scratch, scratch: F.Scratch):
        raise NotImplementedError

    def backward(self, conv, dy, saved, x_shape, scratch: F.Scratch):
        raise NotImplementedError

    def saved_bytes(self, conv, input_shape, out_shape, batch: int, itemsize: int) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        return self.description


def get(name: str) -> Algorithm:
    """The algorithm registered under `name`; an unknown name is an error, never a silent fallback."""
    if name not in ALGORITHMS:
        raise CnnctlError(f"unknown convolution algorithm {name!r}", f"use one of: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]()


def candidates(conv, input_shape) -> list[str]:
    """The algorithms that can run this convolution on inputs of this (C, H, W) shape, in registry order."""
    return [name for name, cls in ALGORITHMS.items() if cls().applies(conv, input_shape)]


def default(conv, input_shape) -> str | None:
    """The rule (docs/performance.md has the measurements behind it): 1x1 stride-1 convolutions as one product;
    everything else by the lowering, which measured faster than both Winograd variants on every 3x3 layer of
    the shipped configs at batch 128 (NumPy's transforms cost more memory passes than the products save).
    None: no algorithm applies (a grouped convolution runs as its layer)."""
    options = candidates(conv, input_shape)
    return "pointwise" if "pointwise" in options else (options[0] if options else None)


@register("lowering")
class Lowering(Algorithm):
    description = "column lowering (MEC) and one product per output row; any kernel, stride, padding, dilation"

    def forward(self, conv, x, epilogue, keep, scratch):
        pads = conv.pads(x.shape[2:])
        return F.conv2d_forward(x, conv.params["weight"], conv.params.get("bias"), conv.stride, pads, conv.dilation,
                                keep, epilogue=epilogue, scratch=scratch)

    def backward(self, conv, dy, saved, x_shape, scratch):
        return F.conv2d_backward(dy, saved, conv.params["weight"], x_shape, conv.stride, conv.pads(x_shape[2:]),
                                 conv.dilation, need_dx=conv.needs_input_grad, scratch=scratch)

    def saved_bytes(self, conv, input_shape, out_shape, batch, itemsize):
        c, h, _ = input_shape
        pads = conv.pads(input_shape[1:])
        return (h + pads[0] + pads[1]) * c * conv.kernel_size[1] * out_shape[2] * batch * itemsize


@register("pointwise")
class Pointwise(Algorithm):
    description = "a 1x1 stride-1 unpadded convolution as one product over the batch-innermost input, no copy"

    def applies(self, conv, input_shape):
        return (conv.groups == 1 and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
                and not any(conv.pads(input_shape[1:])))

    def forward(self, conv, x, epilogue, keep, scratch):
        """y (O, H*W*N) = W (O, C) @ x (C, H*W*N) on the batch-innermost input, the epilogue on slices of rows.
        Saves the input (a view) and the epilogue's derivative."""
        weight, bias = conv.params["weight"], conv.params.get("bias")
        n, c, h, w = x.shape
        xc = F.batch_innermost(x, None, "").transpose(1, 2, 3, 0).reshape(c, -1)  # keeps a copy alive for backward
        o = weight.shape[0]
        wm = weight.reshape(o, c)
        y = np.empty((o, h * w * n), x.dtype)
        d = epilogue.derivative(y)
        b2 = None if bias is None else bias[:, None]

        def rows(lo, hi):
            epilogue(np.matmul(wm[lo:hi], xc, out=y[lo:hi]), None if b2 is None else b2[lo:hi],
                     None if d is None else d[lo:hi])

        parallel.split(o, rows, y.size * c // parallel.MAC_PER_NUMBER)
        return y.reshape(o, h, w, n).transpose(3, 0, 1, 2), (xc, d, (n, c, h, w))

    def backward(self, conv, dy, saved, x_shape, scratch):
        weight = conv.params["weight"]
        xc, d, (n, c, h, w) = saved
        o = weight.shape[0]
        dyt = dy.transpose(1, 2, 3, 0)  # (O, H, W, N): free when dy is batch-innermost
        dY = chain((dyt if dyt.flags.c_contiguous else np.ascontiguousarray(dyt)).reshape(o, -1), d)
        dbias = dY.sum(axis=1)
        dweight = np.empty((o, c), dy.dtype)
        parallel.split(o, lambda lo, hi: np.matmul(dY[lo:hi], xc.T, out=dweight[lo:hi]),
                       dweight.size * xc.shape[1] // parallel.MAC_PER_NUMBER)
        dx = None
        if conv.needs_input_grad:
            dxc = np.empty((c, h * w * n), dy.dtype)
            parallel.split(c, lambda lo, hi: np.matmul(weight.reshape(o, c)[:, lo:hi].T, dY, out=dxc[lo:hi]),
                           dxc.size * o // parallel.MAC_PER_NUMBER)
            dx = dxc.reshape(c, h, w, n).transpose(3, 0, 1, 2)
        return dx, dweight.reshape(weight.shape), dbias

    def saved_bytes(self, conv, input_shape, out_shape, batch, itemsize):
        return int(np.prod(input_shape)) * batch * itemsize


class _Winograd(Algorithm):
    m: ClassVar[int]

    def applies(self, conv, input_shape):
        return winograd.applies(conv.kernel_size, conv.stride, conv.dilation, conv.pads(input_shape[1:]), conv.groups)

    def forward(self, conv, x, epilogue, keep, scratch):
        # (C, H, W, N) as a view: the input transform copies it into its padded tiles in any layout
        y, saved = winograd.forward(x.transpose(1, 2, 3, 0), conv.params["weight"], conv.params.get("bias"),
                                    conv.pads(x.shape[2:]), self.m, epilogue)
        return y.transpose(3, 0, 1, 2), saved

    def backward(self, conv, dy, saved, x_shape, scratch):
        dx, dw, db = winograd.backward(dy.transpose(1, 2, 3, 0), saved, conv.params["weight"], tuple(x_shape[1:]),
                                       conv.pads(x_shape[2:]), self.m, conv.needs_input_grad)
        return (None if dx is None else dx.transpose(3, 0, 1, 2)), dw, db

    def saved_bytes(self, conv, input_shape, out_shape, batch, itemsize):
        c, h, w = input_shape
        _, _, ty, tx = winograd.tiles(h, w, conv.pads((h, w)), self.m)
        return (self.m + 2) ** 2 * c * ty * tx * batch * itemsize


@register("winograd2")
class Winograd2(_Winograd):
    m = 2
    description = "Winograd F(2x2, 3x3): 2.25x fewer multiply-adds; 3x3, stride 1, padding <= 2"


@register("winograd4")
class Winograd4(_Winograd):
    m = 4
    description = ("Winograd F(4x4, 3x3): 4x fewer multiply-adds, a few more bits of float32 rounding; 3x3, "
                   "stride 1, padding <= 2")
