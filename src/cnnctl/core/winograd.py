"""Winograd's minimal filtering for 3x3 stride-1 convolutions, F(2x2, 3x3) and F(4x4, 3x3) (Lavin and Gray,
"Fast Algorithms for Convolutional Neural Networks", 2016), in all three products of a training step.

Each output tile of m x m pixels is computed from an input tile of a x a = (m + 2) x (m + 2) pixels as

    Y = A^T [ U (.) V ] A,    U = G g G^T (the kernel, a x a),    V = B^T d B (the input tile, a x a)

where (.) is the element-wise product; summed over the input channels, the a*a element-wise products become
a*a matrix products (O, C) @ (C, tiles*N): 16 or 36 products instead of 9 per output pixel's 4 or 16, so
F(2x2, 3x3) does 2.25x fewer multiply-adds than the direct convolution and F(4x4, 3x3) 4x fewer.

Backward, with the same transforms:
  * the weight gradient: Y is linear in U, so dL/dU = sum over tiles of (A dY A^T) (.) V, which is a*a
    products (O, tiles*N) @ (tiles*N, C) over the V saved by forward, and dL/dg = G^T (dL/dU) G;
  * the input gradient is the full correlation of the deltas with the 180-degree-rotated kernel, itself a
    3x3 stride-1 convolution (input and output channels swapped, padding k - 1 - p): the forward algorithm
    run on the deltas.

Arrays are batch-innermost like the rest of the core: the input (C, H, W, N), the transformed tiles
(a*a, C, TY*TX*N). The transforms are sums of strided slices with the matrices' coefficients: Python loops
run over the a (or m) tile offsets only. Float32 rounding: F(2x2, 3x3) adds about one bit of error to a
direct convolution, F(4x4, 3x3) a few more (its transform has coefficients up to 8); docs/backprop.md lists
the measured errors against the direct convolution next to the tests' tolerances.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import parallel
from .epilogue import NONE, Epilogue, chain

# the transforms, as in Lavin and Gray (2016), with the interpolation points 0, 1, -1 (m = 2) and 0, +-1, +-2
# (m = 4); B^T is a x a, G is a x 3, A^T is m x a
MATRICES = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64),
    ),
    4: (
        np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64),
    ),
}


def applies(kernel, stride, dilation, pads, groups: int = 1) -> bool:
    """Whether a convolution can run as Winograd: 3x3, stride 1, no dilation, ungrouped, padding at most 2."""
    return (tuple(kernel) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and groups == 1
            and all(0 <= p <= 2 for p in pads))


def _combine(coeffs: np.ndarray, parts, out: np.ndarray) -> None:
    """out = sum_k coeffs[k] * parts[k] over the non-zero coefficients (a copy, an add or a subtract for +-1)."""
    first = True
    for k, c in enumerate(coeffs):
        if c == 0:
            continue
        p = parts[k]
        if first:
            if c == 1:
                out[...] = p
            else:
                np.multiply(p, out.dtype.type(c), out=out)
            first = False
        elif c == 1:
            out += p
        elif c == -1:
            out -= p
        else:
            out += out.dtype.type(c) * p
    if first:
        out[...] = 0


def transform_kernel(weight: np.ndarray, m: int) -> np.ndarray:
    """U = G g G^T for every (o, c): (a*a, O, C), computed in float64 and cast to the weight's dtype."""
    _, g, _ = MATRICES[m]
    u = np.einsum("ai,ocij,bj->aboc", g, weight.astype(np.float64), g)
    return np.ascontiguousarray(u.reshape(-1, *weight.shape[:2]), dtype=weight.dtype)


def kernel_gradient(du: np.ndarray, m: int) -> np.ndarray:
    """dL/dg = G^T (dL/dU) G from dL/dU (a*a, O, C): (O, C, 3, 3)."""
    _, g, _ = MATRICES[m]
    a = m + 2
    d = du.astype(np.float64).reshape(a, a, *du.shape[1:])
    return np.einsum("ai,aboc,bj->ocij", g, d, g).astype(du.dtype)


def tiles(h: int, w: int, pads, m: int) -> tuple[int, int, int, int]:
    """(OH, OW, TY, TX): the output size of a 3x3 stride-1 convolution and the m x m tiles that cover it."""
    oh, ow = h + pads[0] + pads[1] - 2, w + pads[2] + pads[3] - 2
    return oh, ow, -(-oh // m), -(-ow // m)


def transform_input(x: np.ndarray, pads, m: int) -> np.ndarray:
    """V = B^T d B for every input tile: x (C, H, W, N) -> (a*a, C, TY*TX*N). The input is placed in a zeroed
    array of (TY*m + 2) x (TX*m + 2) pixels (its padding, and zeros past the last full tile)."""
    bt, _, _ = MATRICES[m]
    a = m + 2
    c, h, w, n = x.shape
    oh, ow, ty, tx = tiles(h, w, pads, m)
    xp = np.zeros((c, ty * m + 2, tx * m + 2, n), x.dtype)
    xp[:, pads[0] : pads[0] + h, pads[2] : pads[2] + w] = x
    rows = np.empty((a, c, ty, tx * m + 2, n), x.dtype)
    v = np.empty((a, a, c, ty, tx, n), x.dtype)

    def channels(lo, hi):
        part = xp[lo:hi]
        row_parts = [part[:, i : i + m * ty : m] for i in range(a)]  # (c, TY, Wp, N): tile row offset i
        for r in range(a):
            _combine(bt[r], row_parts, rows[r, lo:hi])
        for r in range(a):
            col_parts = [rows[r, lo:hi, :, j : j + m * tx : m] for j in range(a)]
            for s in range(a):
                _combine(bt[s], col_parts, v[r, s, lo:hi])

    parallel.split(c, channels, v.size * 2)
    return v.reshape(a * a, c, ty * tx * n)


def transform_output(mprod: np.ndarray, oh: int, ow: int, ty: int, tx: int, n: int, m: int,
                     out: np.ndarray) -> np.ndarray:
    """Y = A^T M A for every tile: M (a*a, O, TY*TX*N) -> out (O, OH, OW, N), the tiles cut to the output."""
    _, _, at = MATRICES[m]
    a = m + 2
    o = mprod.shape[1]
    mt = mprod.reshape(a, a, o, ty, tx, n)
    full = out if (ty * m, tx * m) == (oh, ow) else np.empty((o, ty * m, tx * m, n), out.dtype)

    def channels(lo, hi):
        half = np.empty((m, a, hi - lo, ty, tx, n), out.dtype)
        for p in range(m):
            for s in range(a):
                _combine(at[p], [mt[r, s, lo:hi] for r in range(a)], half[p, s])
        for p in range(m):
            for q in range(m):
                _combine(at[q], [half[p, s] for s in range(a)], full[lo:hi, p::m, q::m])

    parallel.split(o, channels, mprod.size * 2)
    if full is not out:
        out[...] = full[:, :oh, :ow]
    return out


def transform_deltas(dy: np.ndarray, ty: int, tx: int, m: int) -> np.ndarray:
    """A dY A^T for every output tile: dY (O, OH, OW, N) -> (a*a, O, TY*TX*N) (zeros past the output's edge)."""
    _, _, at = MATRICES[m]
    a = m + 2
    o, oh, ow, n = dy.shape
    if (ty * m, tx * m) != (oh, ow):
        full = np.zeros((o, ty * m, tx * m, n), dy.dtype)
        full[:, :oh, :ow] = dy
        dy = full
    z = np.empty((a, a, o, ty, tx, n), dy.dtype)

    def channels(lo, hi):
        half = np.empty((a, m, hi - lo, ty, tx, n), dy.dtype)
        for r in range(a):
            for q in range(m):
                _combine(at[:, r], [dy[lo:hi, p::m, q::m] for p in range(m)], half[r, q])
        for r in range(a):
            for s in range(a):
                _combine(at[:, s], [half[r, q] for q in range(m)], z[r, s, lo:hi])

    parallel.split(o, channels, z.size * 2)
    return z.reshape(a * a, o, ty * tx * n)


class WinogradSaved(NamedTuple):
    v: np.ndarray  # the transformed input tiles (a*a, C, TY*TX*N)
    derivative: np.ndarray | None  # the fused activation's derivative (the epilogue's)


def forward(x: np.ndarray, weight: np.ndarray, bias, pads, m: int = 2, epilogue: Epilogue = NONE):
    """y = f(conv(x, weight) + bias) (f the epilogue's) for x (C, H, W, N): y (O, OH, OW, N), saved."""
    c, h, w, n = x.shape
    o = weight.shape[0]
    oh, ow, ty, tx = tiles(h, w, pads, m)
    v = transform_input(x, pads, m)
    u = transform_kernel(weight, m)
    prod = parallel.matmul(u, v, np.empty((v.shape[0], o, v.shape[2]), x.dtype))
    y = transform_output(prod, oh, ow, ty, tx, n, m, np.empty((o, oh, ow, n), x.dtype))
    d = epilogue.derivative(y)
    if bias is not None or d is not None:
        b4 = None if bias is None else bias[:, None, None, None]
        parallel.split(o, lambda lo, hi: epilogue(y[lo:hi], None if b4 is None else b4[lo:hi],
                                                  None if d is None else d[lo:hi]), y.size)
    return y, WinogradSaved(v, d)


def backward(dy: np.ndarray, saved: WinogradSaved, weight: np.ndarray, x_shape, pads, m: int = 2,
             need_dx: bool = True):
    """Gradients of `forward` for dy (O, OH, OW, N): dx (C, H, W, N) or None, dweight, dbias."""
    o, oh, ow, n = dy.shape
    c, h, w = x_shape[0], x_shape[1], x_shape[2]
    dy = chain(dy, saved.derivative)
    dbias = dy.sum(axis=(1, 2, 3))
    _, _, ty, tx = tiles(h, w, pads, m)
    z = transform_deltas(dy, ty, tx, m)
    v = saved.v
    du = parallel.matmul(z, v.transpose(0, 2, 1), np.empty((z.shape[0], o, c), dy.dtype))
    dweight = kernel_gradient(du, m)
    if not need_dx:
        return None, dweight, dbias
    rotated = np.ascontiguousarray(weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    back = (2 - pads[0], 2 - pads[1], 2 - pads[2], 2 - pads[3])
    dx, _ = forward(dy, rotated, None, back, m)
    return dx, dweight, dbias
