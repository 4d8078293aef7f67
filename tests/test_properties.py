"""Property tests (hypothesis): the shape a layer promises is the shape it produces, and gradients of
random convolutions and poolings keep the adjoint identity <dy, J dx> = <J^T dy, dx>."""

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cnnctl.core import nn
from cnnctl.errors import ShapeError

conv_args = st.fixed_dictionaries({
    "c": st.integers(1, 3), "o": st.integers(1, 4), "k": st.tuples(st.integers(1, 5), st.integers(1, 5)),
    "s": st.tuples(st.integers(1, 3), st.integers(1, 3)), "d": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "p": st.one_of(st.integers(0, 2), st.sampled_from(["same", "valid"])),
    "h": st.integers(1, 13), "w": st.integers(1, 13), "n": st.integers(1, 3),
})


@settings(max_examples=60)
@given(conv_args)
def test_conv_output_shape_promise_and_adjoint(a):
    layer = nn.Conv2D(a["c"], a["o"], a["k"], stride=a["s"], padding=a["p"], dilation=a["d"],
                      rng=np.random.default_rng(0)).to(np.float64)
    layer.needs_input_grad = True
    try:
        promised = layer.output_shape((a["c"], a["h"], a["w"]))
    except ShapeError:  # the kernel does not fit: refused before any data, which is the promise
        assume(False)  # counted as discarded: hypothesis fails the test if too few examples fit
    g = np.random.default_rng(1)
    x = g.standard_normal((a["n"], a["c"], a["h"], a["w"]))
    y = layer.forward(x)
    assert y.shape == (a["n"], *promised)
    # the layer is affine in x: J v = f(x + v) - f(x); check <dy, J v> == <J^T dy, v>
    v, dy = g.standard_normal(x.shape), g.standard_normal(y.shape)
    jv = layer.forward(x + v) - layer.forward(x)
    layer.forward(x)
    jtdy = layer.backward(dy)
    assert abs((dy * jv).sum() - (jtdy * v).sum()) <= 1e-9 * max(1.0, abs((dy * jv).sum()))


@settings(max_examples=60)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.integers(2, 12), st.integers(2, 12),
       st.sampled_from([nn.MaxPool2D, nn.AvgPool2D]))
def test_pool_output_shape_promise(k, s, p, h, w, cls):
    layer = cls(k, stride=s, padding=p)
    try:
        promised = layer.output_shape((2, h, w))
    except ShapeError:
        assume(False)
    x = np.random.default_rng(2).standard_normal((3, 2, h, w)).astype(np.float32)
    y = layer.forward(x)
    assert y.shape == (3, *promised) and y.dtype == np.float32
    assert layer.backward(np.ones_like(y)).shape == x.shape
