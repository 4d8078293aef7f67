"""im2col/col2im against naive loops and the adjoint identity; padding and output-size rules."""

import itertools

import numpy as np
import pytest

from cnnctl import functional as F


def naive_conv(x, w, b, stride, pad4, dilation):
    xp = F.pad(x, pad4)
    n, c, hp, wp = xp.shape
    o, _, kh, kw = w.shape
    oh = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, o, oh, ow))
    for ni in range(n):
        for oi in range(o):
            for yy in range(oh):
                for xx in range(ow):
                    acc = b[oi]
                    for ci in range(c):
                        for i in range(kh):
                            for j in range(kw):
                                acc += w[oi, ci, i, j] * xp[ni, ci, yy * stride[0] + i * dilation[0],
                                                            xx * stride[1] + j * dilation[1]]
                    y[ni, oi, yy, xx] = acc
    return y


@pytest.mark.parametrize("stride,pad4,dilation", [((1, 1), (0, 0, 0, 0), (1, 1)), ((2, 3), (1, 2, 0, 1), (2, 1)),
                                                  ((3, 1), (2, 2, 2, 2), (1, 2))])
def test_conv_forward_matches_naive_loops(stride, pad4, dilation):
    g = np.random.default_rng(0)
    x, w, b = g.standard_normal((2, 3, 9, 8)), g.standard_normal((4, 3, 3, 2)), g.standard_normal(4)
    y, _ = F.conv2d_forward(x, w, b, stride, pad4, dilation)
    np.testing.assert_allclose(y, naive_conv(x, w, b, stride, pad4, dilation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel,stride,dilation", [((3, 3), (1, 1), (1, 1)), ((2, 3), (2, 1), (1, 2)),
                                                    ((3, 1), (3, 2), (2, 1))])
def test_col2im_is_the_adjoint_of_im2col(kernel, stride, dilation):
    """<im2col(x), c> == <x, col2im(c)> for all x and c (batch-innermost (C, H, W, N) layout)."""
    g = np.random.default_rng(1)
    x = g.standard_normal((3, 10, 9, 2))
    out_hw = tuple(F.out_size(s, k, st, 0, d) for s, k, st, d in zip(x.shape[1:3], kernel, stride, dilation))
    cols = F.im2col(x, kernel, stride, dilation, out_hw)
    c = g.standard_normal(cols.shape)
    lhs = (cols * c).sum()
    rhs = (x * F.col2im(c, x.shape[1:3], stride, dilation)).sum()
    assert abs(lhs - rhs) < 1e-9 * max(1.0, abs(lhs))


def test_im2col_matches_naive_indexing():
    g = np.random.default_rng(2)
    x = g.standard_normal((2, 9, 8, 3))
    cols = F.im2col(x, (2, 3), (2, 1), (1, 2), (4, 4))
    shifted = F.im2col(x, (2, 3), (2, 1), (1, 2), (3, 2), origin=(1, 2))
    for c, i, j, y, xx, n in [(0, 0, 0, 0, 0, 0), (1, 1, 2, 3, 3, 2), (1, 0, 1, 2, 1, 1)]:
        assert cols[c, i, j, y, xx, n] == x[c, y * 2 + i * 1, xx * 1 + j * 2, n]
        if y < 3 and xx < 2:
            assert shifted[c, i, j, y, xx, n] == x[c, 1 + y * 2 + i * 1, 2 + xx * 1 + j * 2, n]


@pytest.mark.parametrize("stride,method", [((1, 1), "full"), ((1, 1), "scatter"), ((1, 1), "auto"),
                                           ((2, 1), "scatter"), ((3, 2), "auto")])
def test_conv_backward_input_gradient_paths_agree_with_naive_scatter(stride, method):
    """Both input-gradient paths (full correlation for stride 1, col2im otherwise) equal a naive scatter."""
    g = np.random.default_rng(3)
    x, w = g.standard_normal((2, 2, 9, 8)), g.standard_normal((3, 2, 3, 2))
    pad4, dil = (1, 2, 0, 1), (2, 1)
    y, cols = F.conv2d_forward(x, w, None, stride, pad4, dil)
    dy = g.standard_normal(y.shape)
    dx, _, _ = F.conv2d_backward(dy, cols, w, x.shape, stride, pad4, dil, method=method)
    dxp = np.zeros((2, 2, 9 + 3, 8 + 1))
    for n in range(2):
        for o in range(3):
            for yy in range(y.shape[2]):
                for xx in range(y.shape[3]):
                    for i in range(3):
                        for j in range(2):
                            dxp[n, :, yy * stride[0] + i * dil[0], xx * stride[1] + j * dil[1]] += \
                                w[o, :, i, j] * dy[n, o, yy, xx]
    np.testing.assert_allclose(dx, dxp[:, :, 1:10, 0:8], rtol=1e-10, atol=1e-12)


def test_same_padding_keeps_size():
    for size in (5, 6, 7):
        for k, s, d in [(3, 1, 1), (4, 1, 1), (3, 2, 1), (5, 1, 2), (2, 3, 1)]:
            p = F.resolve_padding("same", (size, size), (k, k), (s, s), (d, d))
            assert F.out_size(size, k, s, p[0] + p[1], d) == -(-size // s)


def test_log_softmax_is_stable_for_huge_logits():
    z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]])
    out = F.log_softmax(z, axis=1)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[1], np.log(1 / 3) * np.ones(3))
    assert out[0, 0] == 0.0


def batch_innermost(a):
    """The same values as a, stored (C, H, W, N) in memory: what conv layers hand to the next layer."""
    return np.ascontiguousarray(a.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)


def channel_major(a):
    """The same values as a, stored (C, N, H, W) in memory."""
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


@pytest.mark.parametrize("tag", ["maxpool2d", "avgpool2d", "conv2d", "batchnorm2d", "flatten"])
def test_layers_give_the_same_numbers_for_any_memory_layout(tag):
    """Layers pick fast paths by memory layout (batch-innermost views from conv, C-order from flatten); the
    values they compute must not depend on it, in any mix of input and delta layouts."""
    from tests.cases import CASES

    layouts = [np.asarray, batch_innermost, channel_major]
    for case_id, factory, shape in CASES[tag]:
        if len(shape) != 4:
            continue
        g = np.random.default_rng(0)
        x = g.standard_normal(shape).astype(np.float32)
        results = []
        for x_layout, dy_layout in itertools.product(layouts, layouts):
            layer = factory(np.random.default_rng(1))
            if hasattr(layer, "needs_input_grad"):
                layer.needs_input_grad = True
            y = layer.forward(x_layout(x), True)
            dy = np.random.default_rng(2).standard_normal(y.shape).astype(np.float32)
            dx = layer.backward(dy_layout(dy) if dy.ndim == 4 else dy)
            results.append((y, dx, [layer.grads[k] for k in sorted(layer.grads)]))
        for y, dx, grads in results[1:]:
            np.testing.assert_allclose(y, results[0][0], rtol=1e-5, atol=1e-6, err_msg=case_id)
            np.testing.assert_allclose(dx, results[0][1], rtol=1e-5, atol=1e-6, err_msg=case_id)
            for a, b in zip(grads, results[0][2]):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=case_id)


@pytest.mark.parametrize("stride,method", [((1, 1), "full"), ((1, 1), "scatter"), ((2, 1), "scatter")])
def test_chunked_columns_give_the_same_gradients(monkeypatch, stride, method):
    """Columns built a few output rows at a time (and rebuilt in backward, except the chunk forward left in
    the scratch buffer) give the same outputs and gradients as one chunk for the whole map, and the same
    as a naive convolution."""
    g = np.random.default_rng(4)
    x, w, b = g.standard_normal((7, 2, 9, 8)), g.standard_normal((3, 2, 3, 2)), g.standard_normal(3)
    pad4, dil = (1, 2, 0, 1), (2, 1)
    results = []
    for chunk_bytes in [1 << 30, 1]:  # one chunk; one output row per chunk
        monkeypatch.setattr(F, "CHUNK_BYTES", chunk_bytes)
        cache = {}
        y, saved = F.conv2d_forward(x, w, b, stride, pad4, dil, cache)
        dy = np.random.default_rng(5).standard_normal(y.shape)
        results.append((y, *F.conv2d_backward(dy, saved, w, x.shape, stride, pad4, dil, cache=cache, method=method)))
    assert len(F.row_chunks(7, 100)) == 7
    np.testing.assert_allclose(results[0][0], naive_conv(x, w, b, stride, pad4, dil), rtol=1e-12, atol=1e-12)
    for one, many in zip(*results):
        np.testing.assert_allclose(many, one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride,method", [((1, 1), "full"), ((1, 1), "scatter"), ((2, 1), "scatter")])
def test_fused_relu_equals_relu_after_conv(stride, method):
    """conv2d_forward(relu=True) and its backward equal max(conv, 0) with the mask applied by hand."""
    g = np.random.default_rng(6)
    x, w, b = g.standard_normal((3, 2, 9, 8)), g.standard_normal((3, 2, 3, 2)), g.standard_normal(3)
    pad4, dil = (1, 2, 0, 1), (2, 1)
    z, saved = F.conv2d_forward(x, w, b, stride, pad4, dil)
    y, fused = F.conv2d_forward(x, w, b, stride, pad4, dil, relu=True)
    np.testing.assert_array_equal(y, np.maximum(z, 0))
    dy = g.standard_normal(y.shape)
    expected = F.conv2d_backward(dy * (z > 0), saved, w, x.shape, stride, pad4, dil, method=method)
    got = F.conv2d_backward(dy, fused, w, x.shape, stride, pad4, dil, method=method)
    for e, a in zip(expected, got):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)
