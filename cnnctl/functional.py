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


def im2col(xp: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair) -> np.ndarray:
    """Padded input (N, C, Hp, Wp) -> columns (N, C, KH, KW, OH, OW), cols[n,c,i,j,y,x] = xp[n,c,y*s+i*d,x*s+j*d]."""
    n, c = xp.shape[:2]
    cols = np.empty((n, c, kernel[0], kernel[1], *out_hw), dtype=xp.dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            cols[:, :, i, j] = xp[(..., *_window(i, j, out_hw, stride, dilation))]
    return cols


def col2im(cols: np.ndarray, padded_hw: Pair, stride: Pair, dilation: Pair) -> np.ndarray:
    """Adjoint of im2col: scatter-add columns (N, C, KH, KW, OH, OW) back onto a padded (N, C, Hp, Wp)."""
    n, c, kh, kw, oh, ow = cols.shape
    xp = np.zeros((n, c, *padded_hw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            xp[(..., *_window(i, j, (oh, ow), stride, dilation))] += cols[:, :, i, j]
    return xp


def conv2d_forward(x, weight, bias, stride: Pair, padding: Padding4, dilation: Pair):
    """y[n,o] = sum_c xcorr(x[n,c], weight[o,c]) + bias[o]. Returns y (N, O, OH, OW) and the columns."""
    o, c, kh, kw = weight.shape
    xp = pad(x, padding)
    out_hw = (
        out_size(xp.shape[2], kh, stride[0], 0, dilation[0]),
        out_size(xp.shape[3], kw, stride[1], 0, dilation[1]),
    )
    cols = im2col(xp, (kh, kw), stride, dilation, out_hw).reshape(x.shape[0], c * kh * kw, -1)  # (N, K, P)
    y = np.matmul(weight.reshape(o, -1), cols)  # (O, K) @ (N, K, P) -> (N, O, P)
    if bias is not None:
        y += bias[:, None]
    return y.reshape(x.shape[0], o, *out_hw), cols


def conv2d_backward(dy, cols, weight, x_shape, stride: Pair, padding: Padding4, dilation: Pair, need_dx=True):
    """Gradients of conv2d_forward. Returns dx (or None), dweight, dbias.

    dweight = xcorr(input, deltas): sum over n and p of dy[n,o,p] * cols[n,k,p].
    dx = full convolution of the deltas with the 180-degree-rotated kernel, computed as W^T dy then col2im.
    """
    n, o = dy.shape[:2]
    dy3 = dy.reshape(n, o, -1)  # (N, O, P)
    dweight = np.tensordot(dy3, cols, axes=([0, 2], [0, 2])).reshape(weight.shape)
    dbias = dy3.sum(axis=(0, 2))
    if not need_dx:
        return None, dweight, dbias
    dcols = np.matmul(weight.reshape(o, -1).T, dy3)  # (K, O) @ (N, O, P) -> (N, K, P)
    dcols = dcols.reshape(n, weight.shape[1], weight.shape[2], weight.shape[3], *dy.shape[2:])
    padded_hw = (x_shape[2] + padding[0] + padding[1], x_shape[3] + padding[2] + padding[3])
    return unpad(col2im(dcols, padded_hw, stride, dilation), padding), dweight, dbias


def pool_windows(xp: np.ndarray, kernel: Pair, stride: Pair, out_hw: Pair) -> np.ndarray:
    """Padded input (N, C, Hp, Wp) -> (KH*KW, N, C, OH, OW), one strided slice per kernel offset."""
    return np.stack(
        [xp[(..., *_window(i, j, out_hw, stride, (1, 1)))] for i in range(kernel[0]) for j in range(kernel[1])]
    )


def pool_scatter(dwin: np.ndarray, padded_shape, kernel: Pair, stride: Pair) -> np.ndarray:
    """Adjoint of pool_windows: add (KH*KW, N, C, OH, OW) back onto a zero padded input."""
    dxp = np.zeros(padded_shape, dtype=dwin.dtype)
    out_hw = dwin.shape[-2:]
    for k in range(dwin.shape[0]):
        i, j = divmod(k, kernel[1])
        dxp[(..., *_window(i, j, out_hw, stride, (1, 1)))] += dwin[k]
    return dxp


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable log-softmax (exact for logits of any magnitude)."""
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
