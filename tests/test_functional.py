"""Convolution math against naive loops: the lowering, the three input-gradient paths, reused buffers;
padding and output-size rules."""

import itertools

import numpy as np
import pytest

from cnnctl.core import functional as F
from cnnctl.core import nn


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


@pytest.mark.parametrize("kernel,stride,dilation,pad4,origin", [
    ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), (0, 0)),
    ((2, 3), (2, 1), (1, 2), (1, 2, 0, 1), (0, 0)),
    ((3, 2), (3, 2), (2, 1), (2, 0, 2, 1), (0, 0)),  # row dilation: the gathered (copied) windows
    ((3, 2), (1, 1), (1, 2), (2, 2, 3, 3), (1, 2)),  # an origin, as the full-correlation input gradient uses
])
def test_lowered_row_windows_are_im2col(kernel, stride, dilation, pad4, origin):
    """row_windows(lower(x))[y, (i, c, j), (x, n)] == xpad[n, c, y0 + y*sh + i*dh, x0 + x*sw + j*dw], zeros
    in the padding, for C-order and batch-innermost inputs."""
    g = np.random.default_rng(2)
    x = g.standard_normal((3, 2, 7, 8))
    xpad = F.pad(x, pad4)
    (kh, kw), (sh, sw), (dh, dw), (y0, x0) = kernel, stride, dilation, origin
    oh = (xpad.shape[2] - y0 - dh * (kh - 1) - 1) // sh + 1
    ow = (xpad.shape[3] - x0 - dw * (kw - 1) - 1) // sw + 1
    expected = np.empty((oh, kh, 2, kw, ow, 3))
    for y, i, c, j, xx, n in itertools.product(*map(range, expected.shape)):
        expected[y, i, c, j, xx, n] = xpad[n, c, y0 + y * sh + i * dh, x0 + xx * sw + j * dw]
    for layout in (np.asarray, batch_innermost):
        cache = {}
        for _ in range(2):  # the second call reuses the buffers: the zero border must still be there
            lowered = F.lower(layout(x), pad4, kw, sw, dw, ow, cache, "L", x0=x0)
            windows = F.row_windows(lowered, kh, sh, dh, oh, y0=y0)
            np.testing.assert_array_equal(windows.reshape(expected.shape), expected)


@pytest.mark.parametrize("stride,method", [((1, 1), "full"), ((1, 1), "scatter"), ((1, 1), "rows"),
                                           ((1, 1), "auto"), ((2, 1), "scatter"), ((1, 3), "rows"),
                                           ((3, 2), "auto")])
def test_conv_backward_input_gradient_paths_agree_with_naive_scatter(stride, method):
    """Every input-gradient path (full correlation, row correlation with column scatter, scatter) equals a
    naive scatter loop."""
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
            layer.set_input_grad(True)
            y = layer.forward(x_layout(x), True)
            dy = np.random.default_rng(2).standard_normal(y.shape).astype(np.float32)
            dx = layer.backward(dy_layout(dy) if dy.ndim == 4 else dy)
            results.append((y, dx, [layer.grads[k] for k in sorted(layer.grads)]))
        for y, dx, grads in results[1:]:
            np.testing.assert_allclose(y, results[0][0], rtol=1e-5, atol=1e-6, err_msg=case_id)
            np.testing.assert_allclose(dx, results[0][1], rtol=1e-5, atol=1e-6, err_msg=case_id)
            for a, b in zip(grads, results[0][2]):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=case_id)


@pytest.mark.parametrize("stride,method", [((1, 1), "full"), ((1, 1), "scatter"), ((1, 1), "rows"),
                                           ((2, 1), "scatter"), ((1, 2), "rows")])
def test_reused_buffers_give_the_same_gradients(stride, method):
    """A layer's buffers (the lowered input, zeroed once) and the scratch arrays its model's layers share (the
    lowered deltas, zeroed once, partial products) carry nothing from one step or one layer into the next:
    two convolutions of other strides, paddings and dilations taking turns on one Scratch, step after step,
    give what fresh buffers give, and a naive convolution."""
    g = np.random.default_rng(4)
    w, b = g.standard_normal((3, 2, 3, 2)), g.standard_normal(3)
    layers = [(stride, (1, 2, 0, 1), (2, 1), method, {}), ((1, 1), (2, 0, 1, 1), (1, 2), "full", {}),
              ((2, 2), (1, 1, 1, 1), (1, 1), "scatter", {})]
    shared = F.Scratch()
    for step in range(3):
        x = g.standard_normal((7, 2, 9, 8))
        for st, pad4, dil, how, cache in layers:
            results = []
            for c, s in ((cache, shared), ({}, None)):
                y, saved = F.conv2d_forward(x, w, b, st, pad4, dil, c, scratch=s)
                dy = np.random.default_rng(step).standard_normal(y.shape)
                results.append((y, *F.conv2d_backward(dy, saved, w, x.shape, st, pad4, dil, scratch=s, method=how)))
            np.testing.assert_allclose(results[0][0], naive_conv(x, w, b, st, pad4, dil), rtol=1e-12, atol=1e-12)
            for reused, fresh in zip(*results):
                np.testing.assert_array_equal(reused, fresh)
    assert shared.nbytes > 0


@pytest.mark.parametrize("stride,method", [((1, 1), "full"), ((1, 1), "scatter"), ((1, 1), "rows"),
                                           ((2, 1), "scatter"), ((1, 2), "rows")])
def test_fused_relu_equals_relu_after_conv(stride, method):
    """conv2d_forward with a ReLU epilogue and its backward equal max(conv, 0) with the mask applied by hand."""
    from cnnctl.core.epilogue import Epilogue

    g = np.random.default_rng(6)
    x, w, b = g.standard_normal((3, 2, 9, 8)), g.standard_normal((3, 2, 3, 2)), g.standard_normal(3)
    pad4, dil = (1, 2, 0, 1), (2, 1)
    z, saved = F.conv2d_forward(x, w, b, stride, pad4, dil)
    y, fused = F.conv2d_forward(x, w, b, stride, pad4, dil, epilogue=Epilogue(nn.ReLU()))
    np.testing.assert_array_equal(y, np.maximum(z, 0))
    dy = g.standard_normal(y.shape)
    expected = F.conv2d_backward(dy * (z > 0), saved, w, x.shape, stride, pad4, dil, method=method)
    got = F.conv2d_backward(dy, fused, w, x.shape, stride, pad4, dil, method=method)
    for e, a in zip(expected, got):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("layout", ["batch-innermost", "c-order"])
def test_batchnorm_with_its_activation_in_the_same_pass_gives_the_bits_of_the_two_after_each_other(activation,
                                                                                                    layout, threads):
    """A batchnorm's element-wise activation runs on each slice of channels as it is normalised (in cache): its
    output, its input gradient and its parameters' gradients are those of the batchnorm without an activation
    followed by the activation layer, bit for bit, on the plan's threads."""
    from cnnctl.core.plan import threaded

    g = np.random.default_rng(7)
    shape = (32, 8, 12, 12)
    x = g.standard_normal(shape, dtype=np.float32)
    if layout == "batch-innermost":
        x = np.ascontiguousarray(x.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)
    dy = g.standard_normal(shape, dtype=np.float32)
    threads(2)
    ctx = threaded()
    fused, plain, act = nn.BatchNorm2D(8, activation=activation), nn.BatchNorm2D(8), nn.make_activation(activation)
    y = fused.forward(x, context=ctx)
    assert fused._d is not None  # the activation ran inside the normalisation's pass
    z = act.forward(plain.forward(x, context=ctx), context=ctx)
    np.testing.assert_array_equal(y, z)
    np.testing.assert_array_equal(fused.backward(dy), plain.backward(act.backward(dy)))
    for key in ("weight", "bias"):
        np.testing.assert_array_equal(fused.grads[key], plain.grads[key])


def test_erf_matches_the_standard_library_everywhere():
    import math

    from cnnctl.core import functional as F

    x = np.concatenate([np.linspace(-9, 9, 20001), [0.0, -0.0, 2.5, -2.5, 2.5000001, 40.0, -40.0]])
    np.testing.assert_allclose(F.erf(x), [math.erf(v) for v in x], rtol=0, atol=2e-14)


def test_float32_erf_is_within_a_few_units_of_float32_everywhere():
    import math

    x = np.concatenate([np.linspace(-12, 12, 100001), [0.0, -0.0, 1e-30, -1e-30, 60.0, -60.0]]).astype(np.float32)
    got = F.erf(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [math.erf(float(v)) for v in x], rtol=0, atol=6e-7)


def test_an_elementwise_function_in_tiles_gives_the_values_of_one_call():
    """in_tiles runs GELU a tile at a time over contiguous arrays, a batch-innermost layout (a transposed view) and
    a strided view (given whole): the same bits as one call, and the input left untouched."""
    from cnnctl.core.epilogue import TILE, in_tiles
    from cnnctl.core.nn.activations import GELU, SiLU

    rng = np.random.default_rng(0)
    for act in (GELU(), SiLU()):
        base = (rng.standard_normal((3, 5, 7, TILE // 50)) * 3).astype(np.float32)
        for x in (base, base.transpose(3, 0, 1, 2), base[:, ::2]):
            y1, d1 = np.empty_like(x), act.derivative_like(x)
            act.elementwise(x, y1, d1)
            y2, d2 = np.empty_like(x), act.derivative_like(x)
            before = x.copy()
            in_tiles(act.elementwise, x, y2, d2)
            assert np.array_equal(y1, y2) and np.array_equal(d1, d2) and np.array_equal(x, before)
            inplace, d3 = x.copy(), act.derivative_like(x)
            in_tiles(act.elementwise, inplace, inplace, d3)
            assert np.array_equal(inplace, y1) and np.array_equal(d3, d1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_maximum_with_zero_gives_the_bits_of_numpys_with_a_scalar(dtype):
    """ReLU's max(x, 0) against an array of zeros: NaN of either sign kept as NumPy keeps it, -0, -inf and the
    smallest subnormals as NumPy's scalar form gives them, on strided views, in place, and over CONSTANT_CAP values
    (in blocks of the leading axis, or whole when one row is larger)."""
    bits = np.int32 if dtype == np.float32 else np.int64
    special = np.array([-0.0, 0.0, np.nan, -np.nan, -np.inf, np.inf, 1, -1, 1e-45, -1e-45, 5e-324], dtype)
    rng = np.random.default_rng(0)
    cases = [special, rng.standard_normal((3, 1 << 19)).astype(dtype)[:, ::2],
             rng.standard_normal((8, 4, 6)).astype(dtype).transpose(2, 0, 1),
             rng.standard_normal(F.CONSTANT_CAP + 5).astype(dtype)]
    for x in cases:
        want = np.maximum(x, 0)
        got = F.maximum_zero(x, np.empty_like(x))
        assert np.array_equal(got.view(bits), want.view(bits))
        inplace = x.copy()
        F.maximum_zero(inplace, inplace)
        assert np.array_equal(inplace.view(bits), want.view(bits))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_normal_distribution_function_and_density(dtype):
    """Phi and phi as GELU takes them: float32 within 4e-7 of the float64 values from -12 to 12 (2.6e-7
    measured; the density within 1e-6 and five units of its exponent, relative: 3.8 measured); 0 and 1 at the
    infinities, NaN for NaN, Phi(0) = 1/2 for both signs of zero; a strided view as its copy."""
    import math

    x = np.concatenate([np.linspace(-12, 12, 100_001), [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5]]).astype(dtype)
    cdf, pdf = F.normal_cdf_and_density(x)
    assert cdf.dtype == pdf.dtype == dtype
    xs = x.astype(np.float64)
    want_cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in xs])
    want_pdf = np.exp(-xs * xs / 2) / math.sqrt(2 * math.pi)
    tol = 4e-7 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(cdf, want_cdf, rtol=0, atol=tol)
    # relative: a few units of the exponent x^2 / 2 as float32 holds it (x / sqrt 2 rounded, then squared)
    rtol = 1e-6 + 5 * np.spacing(np.float32(xs * xs / 2)) if dtype == np.float32 else 1e-13
    assert np.all(np.abs(pdf - want_pdf) <= rtol * want_pdf + 1e-44)
    with np.errstate(invalid="ignore"):
        ends_cdf, ends_pdf = F.normal_cdf_and_density(np.array([np.inf, -np.inf, np.nan], dtype))
    np.testing.assert_array_equal(ends_cdf, [1, 0, np.nan])
    np.testing.assert_array_equal(ends_pdf, [0, 0, np.nan])
    strided = np.random.default_rng(3).standard_normal((2, 64, 4)).astype(dtype)[:, ::3]
    for got, want in zip(F.normal_cdf_and_density(strided), F.normal_cdf_and_density(strided.copy())):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softplus_is_logaddexp_to_a_few_units(dtype):
    """softplus in NumPy's vectorised exp and log1p: within 4 units in the last place of np.logaddexp(0, x) from
    -120 to 120, and the same at the ends (infinities, NaN, signed zeros)."""
    x = np.linspace(-120, 120, 100_001).astype(dtype)
    want, got = np.logaddexp(dtype(0), x), F.softplus(x)
    assert np.all(np.abs(got - want) <= 4 * np.spacing(np.abs(want).astype(dtype)))
    ends = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], dtype)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(F.softplus(ends), np.logaddexp(dtype(0), ends))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_leaky_relu_and_elu_by_maxima_give_the_bits_of_selecting(dtype):
    """LeakyReLU's derivative and ELU's output and derivative by maxima against kept constants (np.where ran 5x
    slower): the bits of the np.where forms for slopes and alphas in [0, 1] (NaN where they give NaN), and the
    np.where forms themselves outside it; zeros of both signs, infinities, subnormals, 20 orders of magnitude."""
    bits = np.int32 if dtype == np.float32 else np.int64
    rng = np.random.default_rng(8)
    special = np.array([0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-8, -1e-8, -1e-30, -100, 100], dtype)
    x = np.concatenate([special, (rng.standard_normal(20_000) * np.exp(rng.uniform(-20, 5, 20_000))).astype(dtype)])

    def same(a, b):
        keep = ~np.isnan(b)
        return np.array_equal(np.isnan(a), ~keep) and np.array_equal(a[keep].view(bits), b[keep].view(bits))

    with np.errstate(all="ignore"):
        for slope in (0.0, 0.01, 0.2, 1.0, 1.5, -0.1):
            y, d = np.empty_like(x), np.empty_like(x)
            nn.LeakyReLU(slope).elementwise(x, y, d)
            want_d = np.where(x > 0, dtype(1), dtype(slope))
            assert same(d, want_d) and same(y, x * want_d), slope
        for alpha in (0.0, 0.3, 1.0, 1.7):
            y, d = np.empty_like(x), np.empty_like(x)
            nn.ELU(alpha).elementwise(x, y, d)
            neg = alpha * np.expm1(np.minimum(x, 0))
            assert same(y, np.where(x > 0, x, neg)) and same(d, np.where(x > 0, 1, neg + alpha)), alpha


@pytest.mark.parametrize("c,o,k,stride", [(16, 32, 1, 2), (2, 40, 3, 1), (3, 16, 3, 1), (6, 16, 5, 1), (8, 4, 3, 2)])
def test_the_weight_gradient_either_way_round_is_the_correlation_of_input_and_deltas(c, o, k, stride):
    """conv2d_backward multiplies each output row as (K, O) or, for a thin K (K <= O/2: a 1x1 shortcut), (O, K);
    both give the correlation of the input with the deltas (float64 reference) and the sum of the deltas."""
    g = np.random.default_rng(0)
    x = g.standard_normal((3, c, 9, 8)).astype(np.float32)
    w = g.standard_normal((o, c, k, k)).astype(np.float32)
    y, saved = F.conv2d_forward(x, w, None, (stride, stride), (0, 0, 0, 0), (1, 1))
    dy = g.standard_normal(y.shape).astype(np.float32)
    _, dw, db = F.conv2d_backward(dy, saved, w, x.shape, (stride, stride), (0, 0, 0, 0), (1, 1))
    oh, ow = y.shape[2:]
    ref = np.zeros(w.shape)
    for i, j in itertools.product(range(k), range(k)):
        xs = x[:, :, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride].astype(np.float64)
        ref[:, :, i, j] = np.einsum("nohw,nchw->oc", dy.astype(np.float64), xs)
    assert dw.shape == w.shape and dw.flags.c_contiguous
    np.testing.assert_allclose(dw, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-4, atol=1e-4)
