"""End to end on the core alone: a small CNN trained with plain SGD cuts its loss at least tenfold."""

import numpy as np

from cnnctl.core import nn
from cnnctl.core.optim import SGD
from cnnctl.core.plan import Runner


def make_problem(g, n=256):
    """Is the bright 3x3 blob in the top half or the bottom half? Position varies, so convolution helps."""
    x = g.normal(0, 0.1, (n, 1, 12, 12)).astype(np.float32)
    y = g.integers(0, 2, n)
    rows = np.where(y == 0, g.integers(0, 3, n), g.integers(6, 9, n))
    cols = g.integers(0, 9, n)
    for dr in range(3):
        for dc in range(3):
            x[np.arange(n), 0, rows + dr, cols + dc] += 1.0
    return x, y


def test_small_cnn_cuts_loss_tenfold():
    g = np.random.default_rng(0)
    x, y = make_problem(g)
    model = nn.Model([
        nn.Conv2D(1, 4, 3, padding=1, activation="relu", rng=g), nn.MaxPool2D(2),
        nn.Conv2D(4, 8, 3, padding=1, activation="relu", rng=g), nn.MaxPool2D(2),
        nn.Flatten(), nn.Dense(8 * 3 * 3, 2, rng=g),
    ])
    loss, opt = nn.CrossEntropyLoss(), SGD(model, lr=0.05)
    first = loss.forward(model.forward(x, training=False), y)
    for _ in range(300):
        idx = g.integers(0, len(x), 32)
        loss.forward(model.forward(x[idx]), y[idx])
        model.backward(loss.backward())
        opt.step()
    last = loss.forward(model.forward(x, training=False), y)
    assert last < first / 10, (first, last)
    assert (model.forward(x, training=False).argmax(1) == y).mean() > 0.97


def test_relu_moved_after_max_pooling_changes_no_number():
    """The plan applies a conv's ReLU after the max pooling that follows it. Outputs, every parameter
    gradient and the input gradient equal running the same layers one by one, each with its own
    activation, in float64 (exactly the same maxima are chosen), with plain and overlapping pooling."""
    def layers(g):
        return [nn.Conv2D(2, 3, 3, padding=1, activation="relu", rng=g, dtype=np.float64), nn.MaxPool2D(2),
                nn.Conv2D(3, 4, 3, padding=1, activation="relu", rng=g, dtype=np.float64),
                nn.MaxPool2D(3, stride=2),
                nn.Flatten(), nn.Dense(4 * 2 * 2, 3, rng=g, dtype=np.float64)]

    x = np.random.default_rng(0).standard_normal((5, 2, 12, 12))
    dy = np.random.default_rng(1).standard_normal((5, 3))
    model = nn.Model(layers(np.random.default_rng(2)))
    model.layers[0].needs_input_grad = True
    run = Runner(model)
    fused = {s.name: s.fused for s in run.plan((2, 12, 12), np.float64).steps}
    assert fused["layers.1"] == ["relu of layers.0"] and fused["layers.3"] == ["relu of layers.2"]
    assert "relu" not in fused["layers.0"] and "relu" not in fused["layers.2"]
    one_by_one = layers(np.random.default_rng(2))
    h = x
    for layer in one_by_one:
        h = layer.forward(h, True)
    d = dy
    for layer in reversed(one_by_one):
        d = layer.backward(d)
    np.testing.assert_array_equal(run.forward(x, True), h)
    np.testing.assert_array_equal(run.backward(dy), d)
    for fused, plain in zip(model.layers, one_by_one):
        for key in fused.grads:
            np.testing.assert_array_equal(fused.grads[key], plain.grads[key])
