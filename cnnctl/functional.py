"""Pure array math behind the layers: output sizes, padding, im2col/col2im, convolution and pooling.

Shape letters used throughout:
    N  batch size            C  input channels        O  output channels
    H, W  input height and width (Hp, Wp after padding)
    KH, KW  kernel height and width                   OH, OW  output height and width
    K = C*KH*KW  (one im2col column)

Layers see (N, C, H, W) arrays, but convolutions store them batch-innermost, (C, H, W, N) in memory
("CHWN", as cuda-convnet did): every kernel-offset window, pooling window and padded copy is then a run of
N contiguous numbers rather than a run of W (or, for pooling with stride 2, single numbers), so NumPy
copies it at close to memory speed. A conv layer returns its output as an (N, O, OH, OW) view of an
(O, OH, OW, N) array; following layers work on such views without copies.

The derivation, with the index conventions for stride, padding and dilation, is in docs/backprop.md.
Python loops run over kernel offsets (KH*KW of them) and chunks of output rows only, never over batch
items, channels or pixels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

Pair = tuple[int, int]
Padding4 = tuple[int, int, int, int]  # top, bottom, left, right


def pair(v: int | tuple[int, int] | list[int]) -> Pair:
    """An int or a pair as a (height, width) pair."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def out_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int = 1) -> int:
    """Output length of a sliding window: floor((size + pads - dilation*(kernel-1) - 1) / stride) + 1."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def resolve_padding(padding, hw: Pair, kernel: Pair, stride: Pair, dilation: Pair) -> Padding4:
    """Turn a padding argument (int, pair, "valid" or "same") into explicit (top, bottom, left, right).

    "same" keeps OH = ceil(H / stride); when the total padding is odd the extra row/column goes to the
    bottom/right (TensorFlow's and, for stride 1, PyTorch's convention).
    """
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        pads = []
        for size, k, s, d in zip(hw, kernel, stride, dilation):
            out = -(-size // s)
            total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = pair(padding)
    return ph, ph, pw, pw


def pad(x: np.ndarray, p: Padding4, value: float = 0.0) -> np.ndarray:
    """Pad the last two axes of (N, C, H, W) by (top, bottom, left, right)."""
    if not any(p):
        return x
    return np.pad(x, ((0, 0), (0, 0), (p[0], p[1]), (p[2], p[3])), constant_values=value)


def unpad(xp: np.ndarray, p: Padding4) -> np.ndarray:
    """Inverse of pad: cut the padding off the last two axes."""
    return xp[:, :, p[0] : xp.shape[2] - p[1], p[2] : xp.shape[3] - p[3]]


def _window(i: int, j: int, out_hw: Pair, stride: Pair, dilation: Pair, origin: Pair = (0, 0)):
    """The strided (rows, columns) slices of a padded input that kernel offset (i, j) sees at every output
    position, for outputs whose first one reads from `origin`."""
    (oh, ow), (sh, sw), (dh, dw), (y0, x0) = out_hw, stride, dilation, origin
    return (
        slice(y0 + i * dh, y0 + i * dh + sh * (oh - 1) + 1, sh),
        slice(x0 + j * dw, x0 + j * dw + sw * (ow - 1) + 1, sw),
    )


def buffer(cache: dict | None, name: str, shape: tuple, dtype, zero: bool = False) -> np.ndarray:
    """A scratch array reused across calls while its shape and dtype stay the same (zeroed when created,
    if asked: callers that only ever write its interior keep a zero border for free)."""
    if cache is None:
        return (np.zeros if zero else np.empty)(shape, dtype)
    b = cache.get(name)
    if b is None or b.shape != shape or b.dtype != dtype:
        b = cache[name] = (np.zeros if zero else np.empty)(shape, dtype)
    return b


def in_layout_of(a: np.ndarray, like: np.ndarray) -> np.ndarray:
    """`a` with its axes laid out in memory in the same order as `like`'s (a copy only when they differ).
    Element-wise NumPy calls on operands with different layouts (say a channel-major view and a C-order
    array) walk one of them with large strides and run several times slower."""
    def order(v):
        return sorted(range(v.ndim), key=lambda i: -v.strides[i])
    if a.ndim != like.ndim or order(a) == order(like):
        return a
    out = np.empty_like(like, dtype=a.dtype)
    out[...] = a
    return out


def im2col(xp: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair, out=None,
           origin: Pair = (0, 0)) -> np.ndarray:
    """Padded CHWN input (C, Hp, Wp, N) -> columns (C, KH, KW, OH, OW, N):
    cols[c, i, j, y, x, n] = xp[c, y0 + y*sh + i*dh, x0 + x*sw + j*dw, n] with (y0, x0) = origin.
    One strided slice copy per kernel offset."""
    c, n = xp.shape[0], xp.shape[3]
    cols = np.empty((c, kernel[0], kernel[1], *out_hw, n), dtype=xp.dtype) if out is None else out
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            cols[:, i, j] = xp[(slice(None), *_window(i, j, out_hw, stride, dilation, origin))]
    return cols


def col2im(cols: np.ndarray, padded_hw: Pair, stride: Pair, dilation: Pair, out=None,
           origin: Pair = (0, 0)) -> np.ndarray:
    """Adjoint of im2col: scatter-add columns (C, KH, KW, OH, OW, N) onto (C, Hp, Wp, N), zeros or `out`."""
    c, kh, kw, oh, ow, n = cols.shape
    xp = np.zeros((c, *padded_hw, n), dtype=cols.dtype) if out is None else out
    for i in range(kh):
        for j in range(kw):
            xp[(slice(None), *_window(i, j, (oh, ow), stride, dilation, origin))] += cols[:, i, j]
    return xp


def padded_chwn(x: np.ndarray, pad4: Padding4, cache: dict | None, name: str) -> np.ndarray:
    """x (N, C, H, W), in any memory layout, copied into a zero-bordered CHWN buffer (C, Hp, Wp, N)."""
    n, c, h, w = x.shape
    xp = buffer(cache, name, (c, h + pad4[0] + pad4[1], w + pad4[2] + pad4[3], n), x.dtype, zero=True)
    xp[:, pad4[0] : pad4[0] + h, pad4[2] : pad4[2] + w] = x.transpose(1, 2, 3, 0)
    return xp


CHUNK_BYTES = 16 << 20
"""Columns are built for a few output rows at a time, about this many bytes, so that the matrix product
reads them from cache rather than memory; backward rebuilds them from the padded input it keeps (cheap,
in cache) instead of keeping every layer's columns alive between the passes."""


def row_chunks(rows: int, bytes_per_row: int, target: int | None = None) -> list[tuple[int, int]]:
    """Split `rows` output rows into consecutive [start, stop) ranges of about `target` bytes each."""
    per = max(1, min(rows, (target or CHUNK_BYTES) // max(1, bytes_per_row)))
    return [(i, min(i + per, rows)) for i in range(0, rows, per)]


def merged(a: np.ndarray) -> np.ndarray:
    """A (rows, ...) array as a 2-D (rows, rest) view, raising instead of silently copying, so that writes
    through `out=` land in `a`."""
    v = a.view()
    v.shape = (a.shape[0], -1)
    return v


class _Columns:
    """im2col of one padded CHWN input for chunks of output rows, into one reused scratch buffer. With a
    `cache`, the buffer remembers which chunk it holds, so backward (which walks the chunks in reverse)
    starts from the last chunk forward built without rebuilding it: with a single chunk, nothing is rebuilt."""

    def __init__(self, xp, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair, cache, name: str,
                 origin: Pair = (0, 0)):
        self.xp, self.kernel, self.stride, self.dilation, self.out_hw, self.origin = \
            xp, kernel, stride, dilation, out_hw, origin
        self.k = xp.shape[0] * kernel[0] * kernel[1]
        row = self.k * out_hw[1] * xp.shape[3]  # numbers per output row
        self.chunks = row_chunks(out_hw[0], row * xp.itemsize)
        self.scratch = buffer(cache, name, (row * max(b - a for a, b in self.chunks),), xp.dtype)
        self.cache, self.holds = cache, name + ".holds"

    @staticmethod
    def forget(cache: dict | None, name: str) -> None:
        """Call before the padded input changes: the buffer no longer holds columns of it."""
        if cache is not None:
            cache.pop(name + ".holds", None)

    def __call__(self, a: int, b: int) -> np.ndarray:
        """Columns (K, (b-a)*OW*N) of output rows a..b-1."""
        c, n = self.xp.shape[0], self.xp.shape[3]
        shape = (c, *self.kernel, b - a, self.out_hw[1], n)
        cols = self.scratch[: math.prod(shape)].reshape(shape)
        if self.cache is None or self.cache.get(self.holds) != (a, b):
            origin = (self.origin[0] + a * self.stride[0], self.origin[1])
            im2col(self.xp, self.kernel, self.stride, self.dilation, shape[3:5], out=cols, origin=origin)
            if self.cache is not None:
                self.cache[self.holds] = (a, b)
        return cols.reshape(self.k, -1)


class ConvSaved(NamedTuple):
    """What conv2d_forward leaves for conv2d_backward."""

    padded: np.ndarray  # the padded input, (C, Hp, Wp, N)
    relu_mask: np.ndarray | None  # where the pre-activation was > 0, when a ReLU was fused


def conv2d_forward(x, weight, bias, stride: Pair, padding: Padding4, dilation: Pair, cache: dict | None = None,
                   relu: bool = False):
    """y[n,o] = sum_c xcorr(x[n,c], weight[o,c]) + bias[o], as matrix products over im2col columns, followed
    by max(y, 0) when `relu` (applied in place on the contiguous product).

    Returns y (N, O, OH, OW), a view of an (O, OH, OW, N) array, and a ConvSaved for backward. Columns
    are built a few output rows at a time (CHUNK_BYTES); `cache` keeps scratch buffers between calls.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    hp, wp = h + padding[0] + padding[1], w + padding[2] + padding[3]
    out_hw = (out_size(hp, kh, stride[0], 0, dilation[0]), out_size(wp, kw, stride[1], 0, dilation[1]))
    _Columns.forget(cache, "cols")  # the padded input is about to change
    xp = padded_chwn(x, padding, cache, "xp")
    columns = _Columns(xp, (kh, kw), stride, dilation, out_hw, cache, "cols")
    y = np.empty((o, *out_hw, n), x.dtype)
    wmat = weight.reshape(o, -1)
    for a, b in columns.chunks:
        np.matmul(wmat, columns(a, b), out=merged(y[:, a:b]))  # (O, K) @ (K, rows*OW*N) -> (O, rows*OW*N)
    if bias is not None:
        y += bias[:, None, None, None]
    mask = None
    if relu:
        mask = np.greater(y, 0)
        np.maximum(y, 0, out=y)
    return y.transpose(3, 0, 1, 2), ConvSaved(xp, mask)


def conv2d_backward(dy, saved, weight, x_shape, stride: Pair, padding: Padding4, dilation: Pair, need_dx=True,
                    cache: dict | None = None, method: str = "auto"):
    """Gradients of conv2d_forward, given the ConvSaved it returned; dy is the gradient of its output (after
    the fused ReLU, if any: its mask is applied while dy is copied into the layout the products need).
    Returns dx (or None), dweight, dbias.

    dweight: the cross-correlation of the layer input with the deltas, sum over chunks of dY @ cols.T.
    dbias: the sum of the deltas.
    dx: the full convolution of the deltas with the 180-degree-rotated kernel. `method` "full" computes it
    literally: pad the deltas by the kernel span - 1 and correlate them with the rotated kernel (channels
    swapped) at the unpadded input positions (stride 1 only). "scatter" forms W^T dY and scatters each
    kernel offset's slice back to where it was gathered (col2im): the same sum, without the zeros a strided
    full convolution would insert. "auto" takes the full correlation for stride 1 unless its columns
    (O*KH*KW x N*H*W) would be much larger than the scattered ones (C*KH*KW x N*OH*OW).
    """
    n, o, oh, ow = dy.shape
    _, c, kh, kw = weight.shape
    h, w = x_shape[2], x_shape[3]
    hp, wp = h + padding[0] + padding[1], w + padding[2] + padding[3]
    dyt = dy.transpose(1, 2, 3, 0)  # (O, OH, OW, N): free when dy came from conv2d_forward's layout
    if saved.relu_mask is None:
        dY = np.ascontiguousarray(dyt)
    else:
        dY = np.multiply(dyt, saved.relu_mask, out=buffer(cache, "dY", (o, oh, ow, n), dy.dtype))
    columns = _Columns(saved.padded, (kh, kw), stride, dilation, (oh, ow), cache, "cols")
    dweight = np.zeros((o, columns.k), dy.dtype)
    for a, b in reversed(columns.chunks):  # the last chunk forward built first: it may still be in the buffer
        dweight += merged(dY[:, a:b]) @ columns(a, b).T
    dweight = dweight.reshape(weight.shape)
    dbias = dY.sum(axis=(1, 2, 3))
    if not need_dx:
        return None, dweight, dbias
    pt, _, pl, _ = padding
    if method == "auto":
        method = "full" if stride == (1, 1) and o * h * w <= 1.5 * c * oh * ow else "scatter"
    if method == "full":
        if stride != (1, 1):
            raise ValueError("the full-correlation input gradient needs stride 1")
        sh, sw = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))  # span - 1, so oh + sh == hp
        _Columns.forget(cache, "dcols")
        dyp = padded_chwn(dY.transpose(3, 0, 1, 2), (sh, sh, sw, sw), cache, "dyp")
        dcols = _Columns(dyp, (kh, kw), (1, 1), dilation, (h, w), cache, "dcols", origin=(pt, pl))
        rotated = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(c, -1)  # (C, O*KH*KW)
        dx = np.empty((c, h, w, n), dy.dtype)
        for a, b in dcols.chunks:
            np.matmul(rotated, dcols(a, b), out=merged(dx[:, a:b]))
        return dx.transpose(3, 0, 1, 2), dweight, dbias
    wt = weight.reshape(o, -1).T  # (K, O)
    dxp = np.zeros((c, hp, wp, n), dy.dtype)
    for a, b in columns.chunks:
        part = (wt @ merged(dY[:, a:b])).reshape(c, kh, kw, b - a, ow, n)
        col2im(part, (hp, wp), stride, dilation, out=dxp, origin=(a * stride[0], 0))
    return dxp[:, pt : pt + h, pl : pl + w].transpose(3, 0, 1, 2), dweight, dbias


def pool_slices(xp: np.ndarray, kernel: Pair, stride: Pair, out_hw: Pair):
    """The strided view of a padded (N, C, Hp, Wp) input that each kernel offset sees, in row-major order."""
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            yield xp[(..., *_window(i, j, out_hw, stride, (1, 1)))]


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax (exact for logits of any magnitude)."""
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
