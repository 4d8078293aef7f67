"""Pure array math behind the layers: output sizes, padding, im2col/col2im, convolution and pooling.

Shape letters used throughout:
    N  batch size            C  input channels        O  output channels
    H, W  input height and width (Hp, Wp after padding)
    KH, KW  kernel height and width                   OH, OW  output height and width
    K = C*KH*KW  (one im2col column)                  P = OH*OW  (output positions per map)

The derivation, with the index conventions for stride, padding and dilation, is in docs/backprop.md.
Python loops run over kernel offsets (KH*KW of them) only, never over batch items, channels or pixels.
"""

from __future__ import annotations

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


def _window(i: int, j: int, out_hw: Pair, stride: Pair, dilation: Pair) -> tuple[slice, slice]:
    """The strided slice of a padded input that kernel offset (i, j) sees at every output position."""
    (oh, ow), (sh, sw), (dh, dw) = out_hw, stride, dilation
    return (
        slice(i * dh, i * dh + sh * (oh - 1) + 1, sh),
        slice(j * dw, j * dw + sw * (ow - 1) + 1, sw),
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


def im2col(xc: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair, out=None) -> np.ndarray:
    """Channel-major padded input (C, N, Hp, Wp) -> columns (C, KH, KW, N, OH, OW):
    cols[c, i, j, n, y, x] = xc[c, n, y*s + i*d, x*s + j*d]. One strided slice copy per kernel offset."""
    c, n = xc.shape[:2]
    cols = np.empty((c, kernel[0], kernel[1], n, *out_hw), dtype=xc.dtype) if out is None else out
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            cols[:, i, j] = xc[(..., *_window(i, j, out_hw, stride, dilation))]
    return cols


def col2im(cols: np.ndarray, padded_hw: Pair, stride: Pair, dilation: Pair, out=None) -> np.ndarray:
    """Adjoint of im2col: scatter-add columns (C, KH, KW, N, OH, OW) onto (C, N, Hp, Wp), zeros or `out`."""
    c, kh, kw, n, oh, ow = cols.shape
    xc = np.zeros((c, n, *padded_hw), dtype=cols.dtype) if out is None else out
    for i in range(kh):
        for j in range(kw):
            xc[(..., *_window(i, j, (oh, ow), stride, dilation))] += cols[:, i, j]
    return xc


def _channel_major_padded(x, pad4: Padding4, cache, name, tail: int = 0) -> np.ndarray:
    """x (N, C, H, W) as a channel-major (C, N, Hp, Wp) array padded with zeros, inside a flat buffer
    (C, N, Hp*Wp + tail) whose zero tail lets `im2col_rows` read whole rows past the last one."""
    xt = x.transpose(1, 0, 2, 3)
    c, n, h, w = xt.shape
    hp, wp = h + pad4[0] + pad4[1], w + pad4[2] + pad4[3]
    flat = buffer(cache, name, (c, n, hp * wp + tail), x.dtype, zero=True)
    flat[:, :, : hp * wp].reshape(c, n, hp, wp)[:, :, pad4[0] : pad4[0] + h, pad4[2] : pad4[2] + w] = xt
    return flat


def im2col_rows(flat: np.ndarray, kernel: Pair, dilation: Pair, row_len: int, rows: int, out=None) -> np.ndarray:
    """Stride-1 im2col on whole padded rows: flat (C, N, Hp*Wp + tail) -> (C, KH, KW, N, OH*Wp) with
    cols[c, i, j, n, y*Wp + x] = xp[c, n, y + i*dh, x + j*dw]. Each kernel offset is one contiguous slice
    per image; the columns x >= OW are wrap-around garbage that callers drop (forward) or zero (backward)."""
    c, n = flat.shape[:2]
    span = rows * row_len
    cols = np.empty((c, kernel[0], kernel[1], n, span), dtype=flat.dtype) if out is None else out
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            start = i * dilation[0] * row_len + j * dilation[1]
            cols[:, i, j] = flat[:, :, start : start + span]
    return cols


def col2im_rows(cols: np.ndarray, length: int, dilation: Pair, row_len: int, out=None) -> np.ndarray:
    """Adjoint of im2col_rows: scatter-add (C, KH, KW, N, OH*Wp) onto a flat (C, N, length), zeros or `out`."""
    c, kh, kw, n, span = cols.shape
    flat = np.zeros((c, n, length), dtype=cols.dtype) if out is None else out
    for i in range(kh):
        for j in range(kw):
            start = i * dilation[0] * row_len + j * dilation[1]
            flat[:, :, start : start + span] += cols[:, i, j]
    return flat


CHUNK_BYTES = 16 << 20
"""Columns are built for a few images at a time, about this many bytes, so that the matrix product reads
them from cache rather than memory; backward rebuilds them from the padded input it keeps (cheap, in
cache) instead of keeping every layer's columns alive between the passes."""


def image_chunks(n: int, bytes_per_image: int, target: int | None = None) -> list[tuple[int, int]]:
    """Split a batch of n images into consecutive [start, stop) ranges of about `target` bytes each."""
    per = max(1, min(n, (target or CHUNK_BYTES) // max(1, bytes_per_image)))
    return [(i, min(i + per, n)) for i in range(0, n, per)]


def merged(a: np.ndarray) -> np.ndarray:
    """A (rows, ...) array as a 2-D (rows, rest) view, raising instead of silently copying, so that writes
    through `out=` land in `a`."""
    v = a.view()
    v.shape = (a.shape[0], -1)
    return v


ROWS_MAX_WASTE = 1.1
"""Stride-1 columns cover whole padded rows (im2col_rows: contiguous copies) unless the padded rows are more
than this many times longer than the output rows, when the extra positions would cost more than the
strided copies of the classic layout."""


def rows_layout(stride: Pair, out_w: int, padded_w: int) -> bool:
    return stride == (1, 1) and padded_w <= ROWS_MAX_WASTE * out_w


class _Columns:
    """im2col of one padded channel-major input for chunks of images, into one reused scratch buffer. With a
    `cache`, the buffer remembers which chunk it holds, so backward (which walks the chunks in reverse)
    starts from the last chunk forward built without rebuilding it: with a single chunk, nothing is rebuilt."""

    def __init__(self, flat, hw: Pair, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair, cache, name):
        self.flat, self.hw, self.kernel, self.stride, self.dilation, self.out_hw = \
            flat, hw, kernel, stride, dilation, out_hw
        c, n = flat.shape[:2]
        self.rows_layout = rows_layout(stride, out_hw[1], hw[1])
        self.grid = (out_hw[0], hw[1]) if self.rows_layout else out_hw  # positions per image in the columns
        self.k = c * kernel[0] * kernel[1]
        self.span = self.grid[0] * self.grid[1]
        self.chunks = image_chunks(n, self.k * self.span * flat.itemsize)
        most = max(b - a for a, b in self.chunks)
        self.scratch = buffer(cache, name, (self.k * most * self.span,), flat.dtype)
        self.cache, self.holds = cache, name + ".holds"

    @staticmethod
    def forget(cache: dict | None, name: str) -> None:
        """Call before the padded input changes: the buffer no longer holds columns of it."""
        if cache is not None:
            cache.pop(name + ".holds", None)

    def __call__(self, a: int, b: int) -> np.ndarray:
        """Columns (K, (b-a)*P) of images a..b-1."""
        c, (kh, kw), m = self.flat.shape[0], self.kernel, b - a
        size = self.k * m * self.span
        key = (a, b, self.span)
        if self.cache is not None and self.cache.get(self.holds) == key:
            return self.scratch[:size].reshape(self.k, -1)
        if self.rows_layout:
            out = self.scratch[:size].reshape(c, kh, kw, m, self.span)
            im2col_rows(self.flat[:, a:b], self.kernel, self.dilation, self.hw[1], self.out_hw[0], out=out)
        else:
            out = self.scratch[:size].reshape(c, kh, kw, m, *self.out_hw)
            xc = self.flat.reshape(c, -1, *self.hw)[:, a:b]
            im2col(xc, self.kernel, self.stride, self.dilation, self.out_hw, out=out)
        if self.cache is not None:
            self.cache[self.holds] = key
        return out.reshape(self.k, -1)


class ConvSaved(NamedTuple):
    """What conv2d_forward leaves for conv2d_backward."""

    padded: np.ndarray  # the channel-major padded input (C, N, Hp*Wp + tail)
    relu_mask: np.ndarray | None  # where the pre-activation was > 0, when a ReLU was fused


def conv2d_forward(x, weight, bias, stride: Pair, padding: Padding4, dilation: Pair, cache: dict | None = None,
                   relu: bool = False):
    """y[n,o] = sum_c xcorr(x[n,c], weight[o,c]) + bias[o], as matrix products over im2col columns, followed
    by max(y, 0) when `relu` (applied in place on the contiguous product, before any view is taken).

    Returns y (N, O, OH, OW) and a ConvSaved for backward. Work happens in a channel-major layout,
    so y is a transposed view of an (O, N, OH, OW) array that following layers read without copies. For
    stride 1 the columns cover whole padded rows (see im2col_rows; their extra outputs are dropped),
    otherwise they are the classic (C, KH, KW, N, OH, OW). Columns are built a few images at a time
    (CHUNK_BYTES); `cache` keeps scratch buffers between calls.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    hp, wp = h + padding[0] + padding[1], w + padding[2] + padding[3]
    out_hw = (out_size(hp, kh, stride[0], 0, dilation[0]), out_size(wp, kw, stride[1], 0, dilation[1]))
    tail = dilation[1] * (kw - 1) if rows_layout(stride, out_hw[1], wp) else 0
    _Columns.forget(cache, "cols")  # the padded input is about to change
    flat = _channel_major_padded(x, padding, cache, "xp", tail=tail)
    columns = _Columns(flat, (hp, wp), (kh, kw), stride, dilation, out_hw, cache, "cols")
    y = np.empty((o, n, columns.span), x.dtype)
    wmat = weight.reshape(o, -1)
    for a, b in columns.chunks:
        np.matmul(wmat, columns(a, b), out=merged(y[:, a:b]))  # (O, K) @ (K, m*P) -> (O, m*P)
    if bias is not None:
        y += bias[:, None, None]
    mask = None
    if relu:
        mask = np.greater(y, 0).reshape(o, n, *columns.grid)
        np.maximum(y, 0, out=y)
    return y.reshape(o, n, *columns.grid)[..., : out_hw[1]].transpose(1, 0, 2, 3), ConvSaved(flat, mask)


def conv2d_backward(dy, saved, weight, x_shape, stride: Pair, padding: Padding4, dilation: Pair, need_dx=True,
                    cache: dict | None = None, method: str = "auto"):
    """Gradients of conv2d_forward, given the ConvSaved it returned; dy is the gradient of its output (after
    the fused ReLU, if any: its mask is applied while dy is copied into the layout the products need).
    Returns dx (or None), dweight, dbias.

    dweight: the cross-correlation of the layer input with the deltas, sum over chunks of dY @ cols.T.
    dbias: the sum of the deltas.
    dx: the full convolution of the deltas with the 180-degree-rotated kernel. `method` "full" computes it
    literally: pad the deltas by the kernel span - 1 and correlate them with the rotated kernel (channels
    swapped), one matrix product per chunk (stride 1 only). "scatter" forms W^T dY and scatters each kernel
    offset's slice back to where it was gathered (col2im): the same sum, without the zeros a strided full
    convolution would insert. "auto" takes the full correlation for stride 1 unless its columns
    (O*KH*KW x N*Hp*Wp) would be much larger than the scattered ones (C*KH*KW x N*OH*OW).
    """
    n, o, oh, ow = dy.shape
    _, c, kh, kw = weight.shape
    h, w = x_shape[2], x_shape[3]
    hp, wp = h + padding[0] + padding[1], w + padding[2] + padding[3]
    columns = _Columns(saved.padded, (hp, wp), (kh, kw), stride, dilation, (oh, ow), cache, "cols")
    dyc = dy.transpose(1, 0, 2, 3)  # (O, N, OH, OW): free when dy is channel-major
    if columns.rows_layout:  # deltas on the whole-row grid of the columns, zero in the wrap-around columns
        grid = buffer(cache, "dy_rows", (o, n, oh, wp), dy.dtype, zero=True)
    else:
        grid = np.empty((o, n, oh, ow), dy.dtype)
    if saved.relu_mask is None:
        grid[..., :ow] = dyc
    else:
        np.multiply(dyc, saved.relu_mask[..., :ow], out=grid[..., :ow])
    dY = grid.reshape(o, n, -1)
    dweight = np.zeros((o, columns.k), dy.dtype)
    for a, b in reversed(columns.chunks):  # the last chunk forward built first: it may still be in the buffer
        dweight += merged(dY[:, a:b]) @ columns(a, b).T
    dweight = dweight.reshape(weight.shape)
    dbias = dY.sum(axis=(1, 2))
    if not need_dx:
        return None, dweight, dbias
    pt, _, pl, _ = padding
    if method == "auto":
        method = "full" if stride == (1, 1) and o * h * (ow + 2 * dilation[1] * (kw - 1)) <= 1.5 * c * oh * ow \
            else "scatter"
    if method == "full":
        if stride != (1, 1):
            raise ValueError("the full-correlation input gradient needs stride 1")
        sh, sw = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))  # span - 1, so oh + sh == hp
        _Columns.forget(cache, "dcols")
        masked = grid[..., :ow].transpose(1, 0, 2, 3)  # dy after the fused ReLU's mask, (N, O, OH, OW)
        dyp = _channel_major_padded(masked, (sh, sh, sw, sw), cache, "dyp", tail=sw)
        # only the rows of the unpadded input: whole rows of the padded deltas from row pt on
        row = ow + 2 * sw
        dcols = _Columns(dyp[:, :, pt * row :], (h, row), (kh, kw), (1, 1), dilation, (h, row), cache, "dcols")
        rotated = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(c, -1)  # (C, O*KH*KW)
        dxc = np.empty((c, n, h * row), dy.dtype)
        for a, b in dcols.chunks:
            np.matmul(rotated, dcols(a, b), out=merged(dxc[:, a:b]))
        return dxc.reshape(c, n, h, row)[..., pl : pl + w].transpose(1, 0, 2, 3), dweight, dbias
    wt = weight.reshape(o, -1).T  # (K, O)
    rows = columns.rows_layout
    flat = np.zeros((c, n, hp * wp + dilation[1] * (kw - 1)) if rows else (c, n, hp, wp), dy.dtype)
    for a, b in columns.chunks:
        part = (wt @ merged(dY[:, a:b])).reshape(c, kh, kw, b - a, *columns.grid)
        if rows:
            col2im_rows(part.reshape(c, kh, kw, b - a, -1), 0, dilation, wp, out=flat[:, a:b])
        else:
            col2im(part, (hp, wp), stride, dilation, out=flat[:, a:b])
    dxc = flat[:, :, : hp * wp].reshape(c, n, hp, wp) if rows else flat
    return dxc[:, :, pt : pt + h, pl : pl + w].transpose(1, 0, 2, 3), dweight, dbias


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
