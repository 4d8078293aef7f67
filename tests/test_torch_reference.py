"""Forward outputs and all gradients agree with PyTorch (float32, 1e-4 relative) for every layer and loss.

PyTorch is a test-only reference: these tests skip when it is not installed. Weights move into the torch
modules through load_state_dict with our own parameter names, which checks that names and layouts match.
"""

import numpy as np
import pytest

from cnnctl import functional as F
from cnnctl import nn
from cnnctl.gradcheck import rel_error
from tests.cases import CASES, all_cases, randomize_params

torch = pytest.importorskip("torch")
TOL = 1e-4


def torch_reference(layer):
    """A function x -> y in torch equivalent to layer, with the layer's weights loaded by name."""
    tnn, tf = torch.nn, torch.nn.functional
    acts = {"relu": tf.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "softmax": lambda t: tf.softmax(t, 1),
            "leaky_relu": tf.leaky_relu, "elu": tf.elu}
    act = acts[layer.activation.tag] if layer.activation is not None else (lambda t: t)
    if isinstance(layer, nn.Conv2D):
        module = tnn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, 0,
                            layer.dilation, bias="bias" in layer.params)

        def run(x):
            t, b, l, r = layer._pads(tuple(x.shape[2:]))
            return act(module(tf.pad(x, (l, r, t, b))))
    elif isinstance(layer, nn.Dense):
        module = tnn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params)

        def run(x):
            return act(module(x))
    elif isinstance(layer, (nn.BatchNorm1D, nn.BatchNorm2D)):
        module = (tnn.BatchNorm1d if isinstance(layer, nn.BatchNorm1D) else tnn.BatchNorm2d)(layer.num_features)
        run = module
    else:
        module = {
            nn.MaxPool2D: lambda: tnn.MaxPool2d(getattr(layer, "kernel_size", 1), getattr(layer, "stride", 1),
                                                getattr(layer, "padding", 0)),
            nn.AvgPool2D: lambda: tnn.AvgPool2d(getattr(layer, "kernel_size", 1), getattr(layer, "stride", 1),
                                                getattr(layer, "padding", 0)),
            nn.GlobalAvgPool2D: lambda: tnn.AdaptiveAvgPool2d(1),
            nn.Flatten: tnn.Flatten,
            nn.ReLU: tnn.ReLU,
            nn.LeakyReLU: lambda: tnn.LeakyReLU(getattr(layer, "negative_slope", 0.01)),
            nn.ELU: lambda: tnn.ELU(getattr(layer, "alpha", 1.0)),
            nn.Sigmoid: tnn.Sigmoid,
            nn.Tanh: tnn.Tanh,
            nn.Softmax: lambda: tnn.Softmax(dim=1),
        }[type(layer)]()
        run = (lambda x: module(x).flatten(1)) if isinstance(layer, nn.GlobalAvgPool2D) else module
    state = {k: torch.tensor(v) for k, v in {**layer.params, **layer.buffers}.items()}
    module.load_state_dict(state, strict=True)
    return module, run


def compare(layer, x, training=True, dy_seed=0):
    module, run = torch_reference(layer)
    module.train(training)
    y = layer.forward(x, training)
    dy = np.random.default_rng(dy_seed).standard_normal(y.shape).astype(np.float32)
    if hasattr(layer, "needs_input_grad"):
        layer.needs_input_grad = True
    dx = layer.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = run(xt)
    yt.backward(torch.tensor(dy))
    assert y.dtype == np.float32 and dx.dtype == np.float32
    errors = {"output": rel_error(y, yt.detach().numpy()), "input": rel_error(dx, xt.grad.numpy())}
    tparams = dict(module.named_parameters())
    for key in layer.params:
        errors[key] = rel_error(layer.grads[key], tparams[key].grad.numpy())
    tbuffers = dict(module.named_buffers())
    for key, value in layer.buffers.items():
        errors[key] = rel_error(np.asarray(value, np.float64), tbuffers[key].numpy().astype(np.float64))
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("tag", "case_id", "factory", "shape"), list(all_cases()), ids=lambda v: str(v))
def test_layer_matches_torch(tag, case_id, factory, shape, training):
    g = np.random.default_rng(0)
    layer = factory(g)
    if tag == "dropout":
        pytest.skip("random masks cannot be shared with torch; see test_dropout_semantics")
    randomize_params(layer, g)
    if "running_mean" in layer.buffers:
        layer.buffers["running_mean"] = g.normal(size=layer.num_features).astype(np.float32)
        layer.buffers["running_var"] = g.uniform(0.5, 2.0, size=layer.num_features).astype(np.float32)
    compare(layer, g.standard_normal(shape).astype(np.float32), training)


def random_conv(seed):
    g = np.random.default_rng(seed)
    k = tuple(g.integers(1, 6, 2))
    d = tuple(g.integers(1, 3, 2))
    s = tuple(g.integers(1, 4, 2))
    padding = [0, 1, 2, (1, 2), "same", "valid"][g.integers(0, 6)]
    span = [di * (ki - 1) + 1 for ki, di in zip(k, d)]
    h, w = (int(sp + g.integers(0, 12)) for sp in span)
    c, o, n = (int(v) for v in g.integers(1, 5, 3))
    layer = nn.Conv2D(c, o, k, stride=s, padding=padding, dilation=d, bias=bool(g.integers(0, 2)), rng=g)
    randomize_params(layer, g)
    return layer, g.standard_normal((n, c, h, w)).astype(np.float32)


@pytest.mark.parametrize("seed", range(30))
def test_conv2d_random_shapes_match_torch(seed):
    layer, x = random_conv(seed)
    compare(layer, x, dy_seed=seed)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("cls", [nn.MaxPool2D, nn.AvgPool2D])
def test_pool_random_shapes_match_torch(cls, seed):
    g = np.random.default_rng(seed)
    k = tuple(int(v) for v in g.integers(1, 5, 2))
    s = tuple(int(v) for v in g.integers(1, 4, 2))
    p = tuple(int(g.integers(0, ki // 2 + 1)) for ki in k)
    h, w = (int(ki + g.integers(0, 10)) for ki in k)
    compare(cls(k, stride=s, padding=p), g.standard_normal((2, 3, h, w)).astype(np.float32), dy_seed=seed)


def test_maxpool_ties_route_like_torch():
    """After a ReLU many window values are exactly 0: the delta goes to the first maximum, like torch."""
    x = np.maximum(np.random.default_rng(0).standard_normal((2, 3, 8, 8)), 0).astype(np.float32)
    x[0, 0, :4, :4] = 0.0
    compare(nn.MaxPool2D(2), x)
    compare(nn.MaxPool2D(3, stride=1, padding=1), x)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_cross_entropy_matches_torch(smoothing, scale):
    g = np.random.default_rng(1)
    logits = (g.standard_normal((16, 10)) * scale).astype(np.float32)
    targets = g.integers(0, 10, 16)
    loss = nn.CrossEntropyLoss(label_smoothing=smoothing)
    value = loss.forward(logits, targets)
    grad = loss.backward()
    lt = torch.tensor(logits, requires_grad=True)
    vt = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(lt, torch.tensor(targets))
    vt.backward()
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert abs(value - vt.item()) <= TOL * max(1.0, abs(vt.item()))
    assert rel_error(grad, lt.grad.numpy()) < TOL


def test_mse_matches_torch_with_the_documented_constant():
    g = np.random.default_rng(2)
    out, tgt = g.standard_normal((8, 5)).astype(np.float32), g.standard_normal((8, 5)).astype(np.float32)
    loss = nn.MSELoss()
    value = loss.forward(out, tgt)
    grad = loss.backward()
    ot = torch.tensor(out, requires_grad=True)
    vt = torch.nn.MSELoss(reduction="sum")(ot, torch.tensor(tgt)) / (2 * len(out))  # E = 1/2 (t-o)^2, batch mean
    vt.backward()
    assert abs(value - vt.item()) <= TOL * abs(vt.item())
    assert rel_error(grad, ot.grad.numpy()) < TOL


def test_dropout_semantics():
    """Inverted dropout: kept values scaled by 1/(1-rate), same mask in backward, identity in eval, like torch."""
    x = np.random.default_rng(3).standard_normal((200, 500)).astype(np.float32)
    layer = nn.Dropout(0.3, rng=np.random.default_rng(4))
    y = layer.forward(x, training=True)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.7, rtol=1e-6)
    assert abs(1 - kept.mean() - 0.3) < 0.01
    dy = np.ones_like(x)
    np.testing.assert_allclose(layer.backward(dy), kept / np.float32(0.7), rtol=1e-6)
    reference = torch.nn.Dropout(0.3).eval()(torch.tensor(x)).numpy()
    np.testing.assert_array_equal(layer.forward(x, training=False), reference)


def test_sequential_state_dict_loads_into_torch():
    """A whole LeNet-style stack moves into an equivalent torch nn.Sequential by name, with equal outputs."""
    g = np.random.default_rng(5)
    ours = nn.Sequential([nn.Conv2D(1, 4, 3, padding=1, rng=g), nn.BatchNorm2D(4), nn.ReLU(), nn.MaxPool2D(2),
                          nn.Flatten(), nn.Dense(4 * 7 * 7, 10, rng=g)])
    tnn = torch.nn
    theirs = tnn.Sequential(tnn.Conv2d(1, 4, 3, padding=1), tnn.BatchNorm2d(4), tnn.ReLU(), tnn.MaxPool2d(2),
                            tnn.Flatten(), tnn.Linear(196, 10))
    holder = tnn.Module()
    holder.layers = theirs
    holder.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()}, strict=True)
    x = g.standard_normal((3, 1, 14, 14)).astype(np.float32)
    holder.eval()
    np.testing.assert_allclose(ours.forward(x, training=False), theirs(torch.tensor(x)).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_same_padding_matches_torch_for_stride_one():
    g = np.random.default_rng(6)
    for k in (2, 3, 4):
        p = F.resolve_padding("same", (7, 6), (k, k), (1, 1), (1, 1))
        layer = nn.Conv2D(2, 2, k, padding="same", rng=g)
        conv = torch.nn.Conv2d(2, 2, k, padding="same")
        conv.load_state_dict({kk: torch.tensor(v) for kk, v in layer.params.items()})
        x = g.standard_normal((1, 2, 7, 6)).astype(np.float32)
        np.testing.assert_allclose(layer.forward(x), conv(torch.tensor(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
        assert layer.forward(x).shape[2:] == (7, 6), p


def test_every_layer_is_covered():
    assert set(CASES) == set(nn.REGISTRY)
