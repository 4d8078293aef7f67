"""Pure array math behind the layers: output sizes, padding, the im2col lowering, convolution and pooling.

Shape letters used throughout:
    N  batch size            C  input channels        O  output channels
    H, W  input height and width (Hp, Wp after padding)
    KH, KW  kernel height and width                   OH, OW  output height and width
    K = C*KH*KW  (one im2col column; ordered (KH, C, KW) in the lowered products)

Layers see (N, C, H, W) arrays, but convolutions store them batch-innermost, (C, H, W, N) in memory
("CHWN", as cuda-convnet did): every kernel-column slice, pooling window and scatter-add is then a run of
N contiguous numbers rather than a run of W (or, for pooling with stride 2, single numbers), so NumPy
copies it at close to memory speed. A conv layer returns its output as an (N, O, OH, OW) view of an
(O, OH, OW, N) array; following layers work on such views without copies.

The derivation, with the index conventions for stride, padding and dilation, is in docs/backprop.md.
Python loops run over kernel columns or offsets only, never over batch items, channels or pixels.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import parallel
from .epilogue import NONE, Epilogue, chain
from .pointwise import (  # noqa: F401
    CONSTANT_CAP,
    against_constant,
    erf,
    log_softmax,
    maximum_zero,
    normal_cdf_and_density,
    normalize,
    probabilities,
    sigmoid,
    softmax,
    softplus,
)

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
    """Turn a padding argument (int, pair, four sides, "valid" or "same") into explicit (top, bottom, left, right).

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
    if isinstance(padding, (tuple, list)) and len(padding) == 4:  # (top, bottom, left, right) as given
        return tuple(int(p) for p in padding)  # type: ignore[return-value]
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


def kernel_window(i: int, j: int, out_hw: Pair, stride: Pair, dilation: Pair, origin: Pair = (0, 0)):
    """The strided (rows, columns) slices of a padded input that kernel offset (i, j) sees at every output
    position, for outputs whose first one reads from `origin`."""
    (oh, ow), (sh, sw), (dh, dw), (y0, x0) = out_hw, stride, dilation, origin
    return (
        slice(y0 + i * dh, y0 + i * dh + sh * (oh - 1) + 1, sh),
        slice(x0 + j * dw, x0 + j * dw + sw * (ow - 1) + 1, sw),
    )


class Scratch(dict):
    """Arrays that live only during one call (the input copied batch-innermost for lowering, the deltas in the
    products' layout, the lowered deltas, partial products), shared by every layer of a model: layers run one
    at a time, so one array per (purpose, shape) serves them all, instead of one per layer. (What must outlive
    the call, the lowered input that backward reads, stays with its layer.)"""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.values())


def buffer(cache: dict | Scratch | None, name: str, shape: tuple, dtype, zero: bool = False) -> np.ndarray:
    """A scratch array reused across calls while its shape and dtype stay the same (zeroed when created,
    if asked: callers that only ever write its interior keep a zero border for free, which is why `name`
    must tell apart every pattern of writes). A dict holds one array per name (a layer's own), a Scratch
    one per name and shape (shared by layers); None allocates a new one."""
    if cache is None:
        return (np.zeros if zero else np.empty)(shape, dtype)
    key = (name, tuple(shape), np.dtype(dtype).str) if isinstance(cache, Scratch) else name
    b = cache.get(key)
    if b is None or b.shape != shape or b.dtype != dtype:
        b = cache[key] = (np.zeros if zero else np.empty)(shape, dtype)
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


def chained(dy: np.ndarray, d: np.ndarray, per_channel=parallel.per_channel) -> np.ndarray:
    """dy * d laid out as d, a slice of channels at a time as `per_channel` cuts them (cnnctl's threads by
    default, or a layer's runner's): the backward of an element-wise function whose derivative is d."""
    dy, out = in_layout_of(dy, d), np.empty_like(d, dtype=dy.dtype)
    c = parallel.channels
    per_channel(d, lambda lo, hi: chain(c(dy, lo, hi), c(d, lo, hi), out=c(out, lo, hi)))
    return out


def batch_innermost(x: np.ndarray, cache: dict | Scratch | None, name: str) -> np.ndarray:
    """x (N, C, H, W) as a view of a (C, H, W, N) array: x itself when it already is one (what conv and
    pooling layers return), else a copy into a reused buffer (the network input, C-order)."""
    if x.strides[0] == x.itemsize or x.shape[0] == 1:
        return x
    out = buffer(cache, name, (x.shape[1], x.shape[2], x.shape[3], x.shape[0]), x.dtype)
    xt = x.transpose(1, 2, 3, 0)

    def channels(lo, hi):
        out[lo:hi] = xt[lo:hi]

    parallel.split(x.shape[1], channels, x.size)
    return out.transpose(3, 0, 1, 2)


def lower(x: np.ndarray, pad4: Padding4, kw: int, sw: int, dw: int, ow: int, cache: dict | Scratch | None, name: str,
          x0: int = 0, scratch: Scratch | None = None) -> np.ndarray:
    """Column lowering (MEC): x (N, C, H, W) -> L (Hp, C, KW, OW, N) with
    L[r, c, j, x, n] = xpad[n, c, r, x0 + x*sw + j*dw], xpad being x with `pad4` zeros around it.

    Only the kernel's columns are unrolled (KW strided slice copies, not KH*KW as for im2col): the rows
    i = 0..KH-1 that output row y reads are KH consecutive rows of L, so `row_windows` hands each output
    row's im2col matrix to the matrix product as a view. The buffer's name carries the padding and origin:
    only the interior is written, the zeros around it are written once, when the buffer is created. The input
    copied batch-innermost, when it is not, goes to `scratch` (else `cache`)."""
    n, c, h, w = x.shape
    pt, pb, pl, _ = pad4
    lowered = buffer(cache, f"{name}{pad4}{x0},{sw},{dw},{w}", (h + pt + pb, c, kw, ow, n), x.dtype, zero=True)
    copies = cache if scratch is None else scratch
    src = batch_innermost(x, copies, name + ".chwn").transpose(2, 1, 3, 0)  # (H, C, W, N) view
    places = [(j, *inside(x0 + j * dw - pl, sw, ow, w)) for j in range(kw)]

    def channels(lo, hi):
        for j, xs, cols in places:  # output column x reads input column x0 + x*sw + j*dw - pl at kernel column j
            lowered[pt : pt + h, lo:hi, j, xs] = src[:, lo:hi, cols]

    parallel.split(c, channels, lowered.size)
    return lowered


def inside(first: int, step: int, count: int, size: int) -> tuple[slice, slice]:
    """For positions x in [0, count) reading index first + x*step: the slice of the x whose index lies in
    [0, size), and the slice of those indices (both empty when none does)."""
    lo, hi = max(0, -(first // step)), min(count, -((first - size) // step))
    if lo >= hi:
        return slice(0, 0), slice(0, 0)
    return slice(lo, hi), slice(first + lo * step, first + (hi - 1) * step + 1, step)


def row_windows(lowered: np.ndarray, kh: int, sh: int, dh: int, oh: int, y0: int = 0) -> np.ndarray:
    """(OH, KH*C*KW, OW*N): for each output row y, the im2col matrix of that row, rows ordered (i, c, j),
    made of L's rows y0 + y*sh + i*dh. Without row dilation these are consecutive rows of L, so this is a
    view with overlapping windows (nothing copied); with row dilation, a gathered copy."""
    hp, c, kw, ow, n = lowered.shape
    k, s = kh * c * kw, ow * n
    if dh == 1:
        flat = lowered.reshape(-1)[y0 * c * kw * s :]
        step = flat.itemsize
        return np.lib.stride_tricks.as_strided(flat, (oh, k, s), (sh * c * kw * s * step, s * step, step),
                                               writeable=False)
    rows = y0 + sh * np.arange(oh)[:, None] + dh * np.arange(kh)
    return lowered.reshape(hp, -1)[rows].reshape(oh, k, s)


def by_rows(a: np.ndarray) -> np.ndarray:
    """An (O, OH, OW, N) array as (OH, O, OW*N): one matrix per output row, without copying."""
    v = a.view()
    v.shape = (a.shape[0], a.shape[1], -1)
    return v.transpose(1, 0, 2)


def rows_first(weight: np.ndarray) -> np.ndarray:
    """Weight (O, C, KH, KW) as the (O, KH*C*KW) matrix whose columns follow row_windows' (i, c, j) order."""
    return weight.transpose(0, 2, 1, 3).reshape(weight.shape[0], -1)


class ConvSaved(NamedTuple):
    """What conv2d_forward leaves for conv2d_backward."""

    lowered: np.ndarray  # the lowered input, (Hp, C, KW, OW, N) (see `lower`)
    derivative: np.ndarray | None  # the fused activation's derivative (the epilogue's), laid out as the output


def conv2d_forward(x, weight, bias, stride: Pair, padding: Padding4, dilation: Pair, cache: dict | None = None,
                   epilogue: Epilogue = NONE, scratch: Scratch | None = None):
    """y[n,o] = f(sum_c xcorr(x[n,c], weight[o,c]) + bias[o]), as one matrix product per output row over the
    lowered input; the bias and the element-wise f (`epilogue`) run on each slice of rows while it is in cache.

    Returns y (N, O, OH, OW), a view of an (O, OH, OW, N) array, and a ConvSaved for backward. `cache` (the
    layer's own) keeps the lowered input between calls, `scratch` (shared) what lives only in this call.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    hp, wp = h + padding[0] + padding[1], w + padding[2] + padding[3]
    oh, ow = out_size(hp, kh, stride[0], 0, dilation[0]), out_size(wp, kw, stride[1], 0, dilation[1])
    lowered = lower(x, padding, kw, stride[1], dilation[1], ow, cache, "lowered", scratch=scratch)
    y = np.empty((o, oh, ow, n), x.dtype)
    d = epilogue.derivative(y)
    # (O, K) @ (OH, K, OW*N) -> (OH, O, OW*N): one BLAS call per output row, then the epilogue on those rows
    # while they are in cache; slices of rows go to cnnctl's threads
    wm, windows, yr = rows_first(weight), row_windows(lowered, kh, stride[0], dilation[0], oh), by_rows(y)
    dr = None if d is None else by_rows(d)
    b3 = None if bias is None else bias[:, None]

    def rows(r, c):  # output rows r, their columns c
        epilogue(np.matmul(wm, windows[r][..., c], out=yr[r][..., c]), b3, None if dr is None else dr[r][..., c])

    parallel.split_products(oh, windows.shape[2], y.size * wm.shape[1] // parallel.MAC_PER_NUMBER, rows)
    return y.transpose(3, 0, 1, 2), ConvSaved(lowered, d)


def conv2d_backward(dy, saved, weight, x_shape, stride: Pair, padding: Padding4, dilation: Pair, need_dx=True,
                    scratch: Scratch | None = None, method: str = "auto"):
    """Gradients of conv2d_forward, given the ConvSaved it returned; dy is the gradient of its output (after
    the fused activation, if any: its derivative is applied while dy is copied into the layout the products need).
    Returns dx (or None), dweight, dbias. Its temporary arrays come from `scratch`.

    dweight: the cross-correlation of the layer input with the deltas, the sum over output rows of
    dY[row] @ window[row].T, computed as its transpose unless K = C*KH*KW is thin. dbias: the sum of the deltas.
    At a small batch the weight gradient and the input gradient run side by side, one on each thread
    (`parallel.both`).
    dx: the full convolution of the deltas with the 180-degree-rotated kernel, by one of three algorithms
    (`conv2d_dx_full`, `conv2d_dx_rows`, `conv2d_dx_scatter`; `method` names one, or "auto" picks by
    `dx_method`).
    """
    n, o, oh, ow = dy.shape
    _, c, kh, kw = weight.shape
    dyt = dy.transpose(1, 2, 3, 0)  # (O, OH, OW, N): free when dy came from conv2d_forward's layout
    mask = saved.derivative
    if mask is None and dyt.flags.c_contiguous:  # already in the products' layout: no copy
        dY = dyt
    else:
        dY = buffer(scratch, "dY", (o, oh, ow, n), dy.dtype)
    dbias = np.empty(o, dy.dtype)

    def channels(lo, hi):  # the deltas in the products' layout (times a fused activation's derivative), their sums
        if mask is not None:
            chain(dyt[lo:hi], mask[lo:hi], out=dY[lo:hi])
        elif dY is not dyt:
            dY[lo:hi] = dyt[lo:hi]
        dY[lo:hi].sum(axis=(1, 2, 3), out=dbias[lo:hi])

    parallel.split(o, channels, dY.size)

    def weight_gradient():
        # per output row window @ dY.T, (K, O): OpenBLAS runs it 1.1-1.8x faster than dY @ window.T, (O, K), but
        # where K is thin (a 1x1 shortcut, K <= O/2: 0.8-0.9x); benchmarks/weight_gradient.py
        k = kh * c * kw
        windows, rows = row_windows(saved.lowered, kh, stride[0], dilation[0], oh), by_rows(dY)
        thin = k <= o // 2
        a, b, shape = ((rows, windows.transpose(0, 2, 1), (o, k)) if thin
                       else (windows, rows.transpose(0, 2, 1), (k, o)))
        per_row = parallel.matmul(a, b, buffer(scratch, "per_row", (oh, *shape), dy.dtype))
        summed = np.empty(shape, dy.dtype)
        parallel.split(shape[0], lambda lo, hi: per_row[:, lo:hi].sum(axis=0, out=summed[lo:hi]), per_row.size)
        if thin:
            return np.ascontiguousarray(summed.reshape(o, kh, c, kw).transpose(0, 2, 1, 3))
        return np.ascontiguousarray(summed.reshape(kh, c, kw, o).transpose(3, 1, 0, 2))

    if not need_dx:
        return None, weight_gradient(), dbias
    if method == "auto":
        method = dx_method(weight.shape, x_shape, (oh, ow), stride)

    def input_gradient():
        return DX_METHODS[method](dY, weight, x_shape, stride, padding, dilation, scratch)

    # side by side only where neither would be cut into slices: the products (the weight gradient's multiply-adds;
    # the full correlation's are larger by H*W / (OH*OW)) and the input gradient's scatter, sized as they are cut
    macs = o * kh * c * kw * oh * ow * n * (x_shape[2] * x_shape[3] // (oh * ow) if method == "full" else 1)
    if parallel.uncut(macs // parallel.MAC_PER_NUMBER) and parallel.uncut(c * x_shape[2] * x_shape[3] * n * kw):
        dweight, dx = parallel.both(weight_gradient, input_gradient)  # neither would be cut: one on each thread
    else:
        dweight, dx = weight_gradient(), input_gradient()
    return dx.transpose(3, 0, 1, 2), dweight, dbias


def dx_method(weight_shape, x_shape, out_hw: Pair, stride: Pair) -> str:
    """The input-gradient algorithm that is fastest here: the full correlation for stride 1 unless its
    products (O*KH*KW x N*H*W) would be more than 1.5 times the scattered ones (C*KH*KW x N*OH*OW), else
    "rows" for row stride 1, else "scatter" (measured on LeNet-5 and the CIFAR-size net's layers)."""
    o, c = weight_shape[:2]
    h, w = x_shape[2], x_shape[3]
    if stride == (1, 1) and o * h * w <= 1.5 * c * out_hw[0] * out_hw[1]:
        return "full"
    return "rows" if stride[0] == 1 else "scatter"


def conv2d_dx_full(dY, weight, x_shape, stride: Pair, padding: Padding4, dilation: Pair, scratch=None):
    """dx (C, H, W, N) as the literal full correlation (stride 1 only): pad the deltas dY (O, OH, OW, N) by
    the kernel span - 1 and correlate them with the rotated kernel (channels swapped) at the unpadded input
    positions, with the same lowering as forward."""
    if stride != (1, 1):
        raise ValueError("the full-correlation input gradient needs stride 1")
    _, c, kh, kw = weight.shape
    n, h, w = dY.shape[3], x_shape[2], x_shape[3]
    pt, _, pl, _ = padding
    span_h, span_w = dilation[0] * (kh - 1), dilation[1] * (kw - 1)  # span - 1, so oh + span_h == hp
    lowered = lower(dY.transpose(3, 0, 1, 2), (span_h, span_h, span_w, span_w), kw, 1, dilation[1], w, scratch,
                    "dlowered", x0=pl)
    rotated = rows_first(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (C, KH*O*KW)
    dx = np.empty((c, h, w, n), dY.dtype)
    parallel.matmul(rotated, row_windows(lowered, kh, 1, dilation[0], h, y0=pt), by_rows(dx))
    return dx


def conv2d_dx_rows(dY, weight, x_shape, stride: Pair, padding: Padding4, dilation: Pair, scratch=None):
    """dx (C, H, W, N) for row stride 1: correlate along the rows (one product per input row over KH rows of
    the zero-padded deltas), then KW column scatter-adds instead of KH*KW."""
    if stride[0] != 1:
        raise ValueError("the row-correlation input gradient needs row stride 1")
    o, c, kh, kw = weight.shape
    _, _, ow, n = dY.shape
    h, w = x_shape[2], x_shape[3]
    pt, _, pl, _ = padding
    # input row pt + r receives W[:, :, i]^T dY[pt + r - i*dh] from every kernel row i: KH consecutive
    # (dilated) rows of the zero-padded deltas, read through the same overlapping windows as forward
    span = dilation[0] * (kh - 1)
    # lowering with one kernel column: the deltas rows first, (OH + 2*span, O, 1, OW, N), zero rows around
    padded = lower(dY.transpose(3, 0, 1, 2), (span, span, 0, 0), 1, 1, 1, ow, scratch, "dYrows")
    flipped = weight[:, :, ::-1].transpose(1, 3, 2, 0).reshape(c * kw, kh * o)  # [(c, j), (KH-1-i, o)]
    lifted = parallel.matmul(flipped, row_windows(padded, kh, 1, dilation[0], h, y0=pt),
                             buffer(scratch, "lifted", (h, c * kw, ow * n), dY.dtype)).reshape(h, c, kw, ow, n)
    dx = np.empty((c, h, w, n), dY.dtype)
    places = [(j, *inside(j * dilation[1] - pl, stride[1], ow, w)) for j in range(kw)]

    def channels(lo, hi):
        dx[lo:hi] = 0
        for j, xs, cols in places:  # lifted[r, c, j, x] belongs to input column x*sw + j*dw - pl
            dx[lo:hi, :, cols] += lifted[:, lo:hi, j, xs].transpose(1, 0, 2, 3)

    parallel.split(c, channels, dx.size * kw)
    return dx


def conv2d_dx_scatter(dY, weight, x_shape, stride: Pair, padding: Padding4, dilation: Pair, scratch=None):
    """dx (C, H, W, N) for any stride: form W^T dY and scatter-add each kernel offset's slice back to where
    forward read it (the full convolution's sum without the zeros a strided one would insert)."""
    o, c, kh, kw = weight.shape
    _, oh, ow, n = dY.shape
    h, w = x_shape[2], x_shape[3]
    pt, _, pl, _ = padding
    hp, wp = h + padding[0] + padding[1], w + padding[2] + padding[3]
    parts = parallel.matmul(rows_first(weight).T, by_rows(dY),
                            buffer(scratch, "parts", (oh, kh * c * kw, ow * n), dY.dtype))
    parts = parts.reshape(oh, kh, c, kw, ow, n)
    dxp = np.empty((c, hp, wp, n), dY.dtype)
    windows = [(i, j, kernel_window(i, j, (oh, ow), stride, dilation)) for i in range(kh) for j in range(kw)]

    def channels(lo, hi):
        dxp[lo:hi] = 0
        for i, j, (rows, cols) in windows:
            dxp[lo:hi, rows, cols] += parts[:, i, lo:hi, j].transpose(1, 0, 2, 3)

    parallel.split(c, channels, dxp.size * kh * kw)
    return dxp[:, pt : pt + h, pl : pl + w]


DX_METHODS = {"full": conv2d_dx_full, "rows": conv2d_dx_rows, "scatter": conv2d_dx_scatter}


def pool_slices(xp: np.ndarray, kernel: Pair, stride: Pair, out_hw: Pair):
    """The strided view of a padded (N, C, Hp, Wp) input that each kernel offset sees, in row-major order."""
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            yield xp[(..., *kernel_window(i, j, out_hw, stride, (1, 1)))]
