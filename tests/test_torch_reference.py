"""Forward outputs and all gradients agree with PyTorch (float32, 1e-4 relative) for every layer and loss.

PyTorch is a test-only reference: these tests skip when it is not installed. Weights move into the torch
modules through load_state_dict with our own parameter names, which checks that names and layouts match.
"""

import itertools

import numpy as np
import pytest

from cnnctl.core import functional as F
from cnnctl.core import nn
from cnnctl.tools.gradcheck import rel_error
from tests.cases import CASES, all_cases, randomize_params
from tests.torch_models import TORCH, loaded

torch = pytest.importorskip("torch")
TOL = 1e-4


def test_every_registered_layer_type_has_a_torch_reference():
    assert set(TORCH) == set(nn.REGISTRY), "add the new layer type's torch module to TORCH in tests/torch_models.py"


def compare(layer, x, training=True, dy_seed=0, runner=None):
    """Output, input gradient, every parameter gradient and every buffer after one step agree with the torch
    module built from the same tree (tests/torch_models.py), weights loaded by our names. With `runner` (a
    plan.Runner of the layer, a model): run through its execution plan."""
    module = loaded(layer)
    module.train(training)
    layer.set_input_grad(True)
    net = runner or layer
    y = net.forward(x, training)
    dy = np.random.default_rng(dy_seed).standard_normal(y.shape).astype(np.float32)
    dx = net.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    yt.backward(torch.tensor(dy))
    assert y.dtype == np.float32 and dx.dtype == np.float32
    errors = {"output": rel_error(y, yt.detach().numpy()), "input": rel_error(dx, xt.grad.numpy())}
    tparams = dict(module.named_parameters())
    for p in layer.parameters():
        errors[p.name] = rel_error(p.grad, tparams[p.name].grad.numpy())
    tbuffers = dict(module.named_buffers())
    for name, value in layer.state_dict().items():
        if name in tbuffers:
            errors[name] = rel_error(np.asarray(value, np.float64), tbuffers[name].numpy().astype(np.float64))
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("tag", "case_id", "factory", "shape"), list(all_cases()), ids=lambda v: str(v))
def test_layer_matches_torch(tag, case_id, factory, shape, training):
    g = np.random.default_rng(0)
    layer = factory(g)
    if tag in ("dropout", "dropout2d"):
        pytest.skip("random masks cannot be shared with torch; see test_dropout_semantics")
    randomize_params(layer, g, statistics=True)
    compare(layer, g.standard_normal(shape).astype(np.float32), training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("tag", "case_id", "factory", "shape"), list(all_cases()), ids=lambda v: str(v))
def test_layer_through_the_plan_matches_torch(tag, case_id, factory, shape, training):
    """The same cases as a model run through its execution plan (fusions, algorithms, threads), as training runs
    them: output, input and parameter gradients and buffers against torch."""
    from cnnctl.core.plan import Runner

    g = np.random.default_rng(0)
    layer = factory(g)
    if tag in ("dropout", "dropout2d"):
        pytest.skip("random masks cannot be shared with torch; see test_dropout_semantics")
    randomize_params(layer, g, statistics=True)
    model = nn.Model([layer])
    model.set_input_grad(True)
    compare(model, g.standard_normal(shape).astype(np.float32), training, runner=Runner(model))


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


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_weighted_cross_entropy_matches_torch(smoothing):
    g = np.random.default_rng(5)
    logits = (g.standard_normal((16, 5)) * 3).astype(np.float32)
    targets = g.integers(0, 5, 16)
    weights = g.uniform(0.2, 3.0, 5)
    loss = nn.CrossEntropyLoss(label_smoothing=smoothing, class_weights=weights)
    value, grad = loss.forward(logits, targets), loss.backward()
    lt = torch.tensor(logits, requires_grad=True)
    vt = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32), label_smoothing=smoothing)(
        lt, torch.tensor(targets))
    vt.backward()
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


def test_dropout2d_drops_whole_channels_like_torch():
    """Spatial dropout: each (image, channel) map kept whole and scaled by 1/(1-rate), or zeroed; the same mask in
    backward; the identity in eval; the fraction dropped near the rate (torch's Dropout2d draws its own)."""
    x = np.random.default_rng(3).standard_normal((64, 32, 5, 4)).astype(np.float32) + 5  # no zeros of its own
    layer = nn.Dropout2D(0.25, rng=np.random.default_rng(4))
    y = layer.forward(x, training=True)
    kept = (y != 0).reshape(64, 32, -1)
    assert (kept.all(axis=2) | ~kept.any(axis=2)).all()  # whole maps only
    np.testing.assert_allclose(y[y != 0], x[y != 0] / 0.75, rtol=1e-6)
    assert abs(1 - kept.all(axis=2).mean() - 0.25) < 0.03
    np.testing.assert_allclose(layer.backward(np.ones_like(x)), (y != 0) / np.float32(0.75), rtol=1e-6)
    t = torch.nn.Dropout2d(0.25).train()(torch.tensor(x)).numpy().reshape(64, 32, -1)
    assert abs((t == 0).all(axis=2).mean() - 0.25) < 0.05  # the same semantics in torch
    np.testing.assert_array_equal(layer.forward(x, training=False), torch.nn.Dropout2d(0.25).eval()(
        torch.tensor(x)).numpy())


def test_log_softmax_then_nll_matches_torch_and_equals_cross_entropy():
    g = np.random.default_rng(7)
    logits = (g.standard_normal((16, 10)) * 4).astype(np.float32)
    targets = g.integers(0, 10, 16)
    head, loss = nn.LogSoftmax(), nn.NLLLoss()
    value = loss.forward(head.forward(logits), targets)
    grad = head.backward(loss.backward())
    lt = torch.tensor(logits, requires_grad=True)
    vt = torch.nn.functional.nll_loss(torch.log_softmax(lt, dim=1), torch.tensor(targets))
    vt.backward()
    assert abs(value - vt.item()) <= TOL * max(1.0, abs(vt.item()))
    assert rel_error(grad, lt.grad.numpy()) < TOL
    ce = nn.CrossEntropyLoss()
    assert abs(ce.forward(logits, targets) - value) < 1e-6
    assert rel_error(ce.backward(), grad) < TOL


@pytest.mark.parametrize("pos_weight", [False, True], ids=["plain", "pos_weight"])
def test_bce_with_logits_matches_torch(pos_weight):
    """Multi-label loss and gradient equal torch.nn.BCEWithLogitsLoss (mean over every label of every row),
    logits up to +-40 included; the probabilities predict reads are the sigmoid."""
    g = np.random.default_rng(11)
    logits = (g.standard_normal((16, 6)) * 10).astype(np.float32)
    logits[0, :2] = [40.0, -40.0]
    targets = (g.random((16, 6)) < 0.3).astype(np.uint8)
    weight = g.uniform(0.5, 5.0, 6).astype(np.float32) if pos_weight else None
    loss = nn.BCEWithLogitsLoss(weight)
    value, grad = loss.forward(logits, targets), loss.backward()
    lt = torch.tensor(logits, requires_grad=True)
    vt = torch.nn.BCEWithLogitsLoss(pos_weight=None if weight is None else torch.tensor(weight))(
        lt, torch.tensor(targets, dtype=torch.float32))
    vt.backward()
    assert abs(value - vt.item()) <= TOL * max(1.0, abs(vt.item()))
    assert rel_error(grad, lt.grad.numpy()) < TOL
    assert rel_error(F.probabilities(logits, loss.takes), torch.sigmoid(lt).detach().numpy()) < TOL


def test_sequential_state_dict_loads_into_torch():
    """A whole LeNet-style stack moves into an equivalent torch nn.Sequential by name, with equal outputs."""
    g = np.random.default_rng(5)
    ours = nn.Model([nn.Conv2D(1, 4, 3, padding=1, rng=g), nn.BatchNorm2D(4), nn.ReLU(), nn.MaxPool2D(2),
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


@pytest.mark.parametrize("size", [5, 6, 7, 8])
def test_ceil_mode_and_excluded_padding_match_torch_over_a_grid(size):
    """Every kernel 2-3, stride 1-3 and padding up to half the kernel, ceil_mode on, both averages: torch's
    output sizes and values (the ceil rule drops a last window that would start past the input)."""
    g = np.random.default_rng(size)
    x = g.standard_normal((2, 3, size, size + 1)).astype(np.float32)
    for k, s, p in itertools.product((2, 3), (1, 2, 3), (0, 1)):
        if p > k // 2:
            continue
        ours = [nn.MaxPool2D(k, s, p, ceil_mode=True), nn.AvgPool2D(k, s, p, ceil_mode=True),
                nn.AvgPool2D(k, s, p, ceil_mode=True, count_include_pad=False)]
        theirs = [torch.nn.MaxPool2d(k, s, p, ceil_mode=True), torch.nn.AvgPool2d(k, s, p, ceil_mode=True),
                  torch.nn.AvgPool2d(k, s, p, ceil_mode=True, count_include_pad=False)]
        for a, b in zip(ours, theirs):
            ref = b(torch.from_numpy(x)).numpy()
            got = a.forward(x)
            assert got.shape == ref.shape, (k, s, p, a)
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6, err_msg=repr(a))
