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


def im2col(xc: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair, out=None) -> np.ndarray:
    """Channel-major padded input (C, N, Hp, Wp) -> columns (C, KH, KW, N, OH, OW):
    cols[c, i, j, n, y, x] = xc[c, n, y*s + i*d, x*s + j*d]. One strided slice copy per kernel offset."""
    c, n = xc.shape[:2]
    cols = np.empty((c, kernel[0], kernel[1], n, *out_hw), dtype=xc.dtype) if out is None else out
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            cols[:, i, j] = xc[(..., *_window(i, j, out_hw, stride, dilation))]
    return cols


def col2im(cols: np.ndarray, padded_hw: Pair, stride: Pair, dilation: Pair) -> np.ndarray:
    """Adjoint of im2col: scatter-add columns (C, KH, KW, N, OH, OW) onto a zero (C, N, Hp, Wp)."""
    c, kh, kw, n, oh, ow = cols.shape
    xc = np.zeros((c, n, *padded_hw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            xc[(..., *_window(i, j, (oh, ow), stride, dilation))] += cols[:, i, j]
    return xc


def _channel_major_padded(x, pad4: Padding4, cache, name) -> np.ndarray:
    """x (N, C, H, W) as a channel-major (C, N, Hp, Wp) array, padded with zeros (a view when no padding)."""
    xt = x.transpose(1, 0, 2, 3)
    if not any(pad4):
        return xt
    c, n, h, w = xt.shape
    xc = buffer(cache, name, (c, n, h + pad4[0] + pad4[1], w + pad4[2] + pad4[3]), x.dtype, zero=True)
    xc[:, :, pad4[0] : pad4[0] + h, pad4[2] : pad4[2] + w] = xt
    return xc


def conv2d_forward(x, weight, bias, stride: Pair, padding: Padding4, dilation: Pair, cache: dict | None = None):
    """y[n,o] = sum_c xcorr(x[n,c], weight[o,c]) + bias[o], as one matrix product over columns.

    Returns y (N, O, OH, OW) and the columns (C, KH, KW, N, OH, OW) that backward needs. Work happens in a
    channel-major layout, so y is a transposed view of an (O, N, OH, OW) array: following layers read it
    without copies. `cache` keeps scratch buffers (padded input, columns) between calls.
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    xc = _channel_major_padded(x, padding, cache, "xp")
    out_hw = (out_size(xc.shape[2], kh, stride[0], 0, dilation[0]), out_size(xc.shape[3], kw, stride[1], 0, dilation[1]))
    cols = buffer(cache, "cols", (c, kh, kw, n, *out_hw), x.dtype)
    im2col(xc, (kh, kw), stride, dilation, out_hw, out=cols)
    y = weight.reshape(o, -1) @ cols.reshape(c * kh * kw, -1)  # (O, K) @ (K, N*P) -> (O, N*P)
    if bias is not None:
        y += bias[:, None]
    return y.reshape(o, n, *out_hw).transpose(1, 0, 2, 3), cols


def conv2d_backward(dy, cols, weight, x_shape, stride: Pair, padding: Padding4, dilation: Pair, need_dx=True,
                    cache: dict | None = None, method: str = "auto"):
    """Gradients of conv2d_forward. Returns dx (or None), dweight, dbias.

    dweight: the cross-correlation of the layer input with the deltas, dY (O, N*P) @ cols.T.
    dbias: the sum of the deltas.
    dx: the full convolution of the deltas with the 180-degree-rotated kernel. For stride 1 it is computed
    literally: pad the deltas by the kernel span - 1, correlate with the rotated kernel (channels swapped),
    one matrix product. For larger strides the deltas are scattered back through the kernel instead
    (W^T dY, then col2im), which is the same sum without the zeros a strided full convolution would insert.
    `method` ("auto", "full" or "scatter") picks the path; auto takes the full correlation for stride 1
    unless its columns (O*KH*KW x N*Hp*Wp) would be much larger than the scattered ones (C*KH*KW x N*OH*OW).
    """
    n, o, oh, ow = dy.shape
    _, c, kh, kw = weight.shape
    dY = dy.transpose(1, 0, 2, 3).reshape(o, -1)  # (O, N*P): free when dy is channel-major already
    dweight = (dY @ cols.reshape(c * kh * kw, -1).T).reshape(weight.shape)
    dbias = dY.sum(axis=1)
    if not need_dx:
        return None, dweight, dbias
    h, w = x_shape[2], x_shape[3]
    pt, _, pl, _ = padding
    padded_hw = (h + padding[0] + padding[1], w + padding[2] + padding[3])
    if method == "auto":
        full_cost, scatter_cost = o * padded_hw[0] * padded_hw[1], c * oh * ow
        method = "full" if stride == (1, 1) and full_cost <= 1.5 * scatter_cost else "scatter"
    if method == "full":
        if stride != (1, 1):
            raise ValueError("the full-correlation input gradient needs stride 1")
        sh, sw = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))  # span - 1
        dyp = buffer(cache, "dyp", (o, n, oh + 2 * sh, ow + 2 * sw), dy.dtype, zero=True)
        dyp[:, :, sh : sh + oh, sw : sw + ow] = dY.reshape(o, n, oh, ow)
        full_hw = (oh + sh, ow + sw)  # = the padded input size
        dcols = buffer(cache, "dcols", (o, kh, kw, n, *full_hw), dy.dtype)
        im2col(dyp, (kh, kw), (1, 1), dilation, full_hw, out=dcols)
        rotated = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(c, -1)  # (C, O*KH*KW)
        dxc = (rotated @ dcols.reshape(o * kh * kw, -1)).reshape(c, n, *full_hw)
    else:
        dcols = (weight.reshape(o, -1).T @ dY).reshape(c, kh, kw, n, oh, ow)  # (K, O) @ (O, N*P)
        dxc = col2im(dcols, padded_hw, stride, dilation)
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
