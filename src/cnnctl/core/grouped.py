"""Grouped convolution (groups > 1, depthwise when groups == channels): each group's channels convolved with its own
filters by the ungrouped passes of cnnctl.core.functional, the groups side by side."""

from __future__ import annotations

import numpy as np

from .functional import Padding4, Pair, kernel_window, out_size


def grouped_conv2d_forward(x, weight, bias, stride: Pair, padding: Padding4, dilation: Pair, groups: int):
    """A grouped convolution, block-diagonal over `groups` channel groups: output channels of group g see
    only input channels of group g; weight (O, C/G, KH, KW) as PyTorch's. One batched product per kernel
    offset over the groups (a broadcast multiply-add when each group has one input channel: depthwise).
    Returns y (N, O, OH, OW) (a view of an (O, OH, OW, N) array) and the padded input (C, Hp, Wp, N)."""
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    g, og = groups, o // groups
    xp = np.zeros((c, h + padding[0] + padding[1], w + padding[2] + padding[3], n), x.dtype)
    xp[:, padding[0] : padding[0] + h, padding[2] : padding[2] + w] = x.transpose(1, 2, 3, 0)
    oh, ow = out_size(xp.shape[1], kh, stride[0], 0, dilation[0]), out_size(xp.shape[2], kw, stride[1], 0, dilation[1])
    y = np.zeros((g, og, oh, ow, n), x.dtype)
    for i in range(kh):
        for j in range(kw):
            xs = xp[(slice(None), *kernel_window(i, j, (oh, ow), stride, dilation))]  # (C, OH, OW, N)
            wij = weight[:, :, i, j].reshape(g, og, cg)
            if cg == 1:
                y += wij[..., None, None] * xs.reshape(g, 1, oh, ow, n)
            else:
                y += np.matmul(wij, xs.reshape(g, cg, oh * ow * n)).reshape(g, og, oh, ow, n)
    y = y.reshape(o, oh, ow, n)
    if bias is not None:
        y += bias[:, None, None, None]
    return y.transpose(3, 0, 1, 2), xp


def grouped_conv2d_backward(dy, xp, weight, x_shape, stride: Pair, padding: Padding4, dilation: Pair, groups: int,
                            need_dx=True):
    """Gradients of grouped_conv2d_forward: per kernel offset, dweight[:, :, i, j] is each group's deltas
    times its shifted input, and the input gradient scatter-adds each group's W^T dY where forward read."""
    n, o, oh, ow = dy.shape
    _, cg, kh, kw = weight.shape
    g, og, m = groups, o // groups, oh * ow * n
    dY = np.ascontiguousarray(dy.transpose(1, 2, 3, 0)).reshape(g, og, m)
    dweight = np.empty_like(weight)
    dxp = np.zeros_like(xp) if need_dx else None
    for i in range(kh):
        for j in range(kw):
            window = (slice(None), *kernel_window(i, j, (oh, ow), stride, dilation))
            xs = xp[window].reshape(g, cg, m)  # a copy unless the window is contiguous
            wij = weight[:, :, i, j].reshape(g, og, cg)
            if cg == 1:
                dweight[:, 0, i, j] = np.einsum("gom,gm->go", dY, xs[:, 0]).reshape(o)
            else:
                dweight[:, :, i, j] = np.matmul(dY, xs.transpose(0, 2, 1)).reshape(o, cg)
            if need_dx:
                part = (wij * dY).sum(axis=1) if cg == 1 else np.matmul(wij.transpose(0, 2, 1), dY)
                dxp[window] += part.reshape(-1, oh, ow, n)
    dbias = dY.reshape(o, m).sum(axis=1)
    dx = None
    if need_dx:
        h, w = x_shape[2], x_shape[3]
        dx = dxp[:, padding[0] : padding[0] + h, padding[2] : padding[2] + w].transpose(3, 0, 1, 2)
    return dx, dweight, dbias
