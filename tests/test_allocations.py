"""What a training step allocates, measured with tracemalloc (NumPy reports its arrays to it): after the first
steps a convolution lowers into the buffer it kept (no columns, no padded copy made anew), batchnorm's backward
makes its input gradient and no temporary of that size, and the optimizer's update allocates nothing the size of a
parameter (tests/test_optim_flat.py)."""

import tracemalloc

import numpy as np

from cnnctl.core import nn
from cnnctl.core.plan import Runner


def peak_of(fn) -> int:
    """Bytes allocated at the highest point of fn() above what was allocated before it."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_a_convolution_lowers_into_its_kept_buffer_after_the_first_step():
    """16 channels in, 4 out, 3x3, padding 1: the lowered input is 3.4 times the input, the step's own arrays (the
    output, its ReLU mask, the input gradient, the weight gradient) 1.3 times: a step that lowered into a new
    buffer, or padded the input into one, would pass half the lowered buffer."""
    g = np.random.default_rng(0)
    model = nn.Model([nn.Conv2D(16, 4, 3, padding=1, activation="relu", rng=g)])
    model.set_input_grad(True)
    run = Runner(model)
    x = g.standard_normal((32, 16, 16, 16)).astype(np.float32)
    dy = g.standard_normal((32, 4, 16, 16)).astype(np.float32)

    def step():
        run.forward(x, training=True)
        run.backward(dy)

    first = peak_of(step)
    step()
    lowered = 18 * 16 * 3 * 16 * 32 * 4  # (H + 2, C, KW, OW, N) float32
    assert first > lowered  # the first step makes the buffer (the measurement sees it)
    later = peak_of(step)
    assert later < lowered / 2, f"a later step allocated {later / 1e6:.2f} MB (lowered input {lowered / 1e6:.2f} MB)"


def test_batchnorm_backward_allocates_its_input_gradient_alone():
    g = np.random.default_rng(1)
    x = g.standard_normal((16, 10, 10, 64), dtype=np.float32).transpose(3, 0, 1, 2)  # batch-innermost, as planned
    bn = nn.BatchNorm2D(16)
    dy = np.ones_like(bn.forward(x))
    bn.backward(dy)
    bn.forward(x)
    assert peak_of(lambda: bn.backward(dy)) < 1.1 * x.nbytes


def test_batchnorm_with_an_activation_backward_makes_no_array_for_the_activations_gradient(threads):
    """dy times the activation's derivative goes into the input gradient's memory, slice by slice: the backward
    allocates the input gradient and a temporary per slice of channels in work (2x the input before: the product
    dy * d, then dx; an array small enough to be one slice still takes 2x)."""
    from cnnctl.core.plan import threaded

    g = np.random.default_rng(1)
    x = g.standard_normal((16, 32, 32, 128), dtype=np.float32).transpose(3, 0, 1, 2)  # 8 slices of 2 channels
    threads(2)
    bn = nn.BatchNorm2D(16, activation="relu")
    dy = np.ones_like(bn.forward(x, context=threaded()))
    bn.backward(dy)
    bn.forward(x, context=threaded())
    assert peak_of(lambda: bn.backward(dy)) < 1.4 * x.nbytes


def test_a_residual_networks_gradients_stay_in_the_convolutions_layout(monkeypatch):
    """Global average pooling gives back its gradient laid out as its input (a convolution's batch-innermost
    output), so that the gradients of the residual units' forks add without a copy into another layout (every
    fork copied the convolution's gradient into the C-order layout global pooling gave before: 2.5 ms a ResNet-20
    step at batch 128, measured)."""
    from cnnctl.core import functional as F
    from tests.cases import basic_block

    g = np.random.default_rng(2)
    model = nn.Model([nn.Conv2D(3, 8, 3, padding=1, bias=False, rng=g), nn.BatchNorm2D(8, activation="relu"),
                      basic_block(g, 8, 8, 1), basic_block(g, 8, 16, 2), nn.GlobalAvgPool2D(),
                      nn.Dense(16, 4, rng=g)])
    runner = Runner(model)
    x = g.standard_normal((6, 3, 8, 8)).astype(np.float32)
    copies = []
    original = F.in_layout_of

    def counting(a, like):
        out = original(a, like)
        copies.extend([a.shape] if out is not a else [])
        return out

    monkeypatch.setattr(F, "in_layout_of", counting)  # every layer calls it through the module
    out = runner.forward(x)
    runner.backward(np.ones_like(out))
    assert copies == []
    gap = nn.GlobalAvgPool2D()
    inner = g.standard_normal((4, 5, 3, 6)).astype(np.float32).transpose(3, 0, 1, 2)  # (6, 4, 5, 3) batch-innermost
    dy = g.standard_normal((6, 4)).astype(np.float32)
    gap.forward(inner)
    dx = gap.backward(dy)
    assert dx.strides[0] == dx.itemsize
    np.testing.assert_array_equal(dx, np.broadcast_to((dy / 15)[:, :, None, None], (6, 4, 5, 3)))


def test_dropout_keeps_its_inputs_layout_forward_and_backward():
    """A dense layer's output is (features, batch) in memory: dropout's output and input gradient stay so (they
    came back in C order), with the values of the mask drawn in C order as before."""
    g = np.random.default_rng(3)
    x = g.standard_normal((32, 6)).astype(np.float32).T  # (6, 32) viewed from a (32, 6) array
    y = nn.Dropout(0.5, rng=np.random.default_rng(4)).forward(x)
    drop = nn.Dropout(0.5, rng=np.random.default_rng(4))
    out = drop.forward(x)
    keep = np.random.default_rng(4).random(x.shape, dtype=np.float32) >= 0.5
    np.testing.assert_array_equal(out, x * (keep / np.float32(0.5)))
    np.testing.assert_array_equal(out, y)
    dx = drop.backward(np.ones_like(out))
    assert out.strides == x.strides and dx.strides == x.strides
