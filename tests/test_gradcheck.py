"""Central-difference gradient checks (float64) for every registered layer and both losses."""

import itertools

import numpy as np
import pytest

from cnnctl.core import nn
from cnnctl.tools.gradcheck import check_layer, check_loss
from tests.cases import CASES, all_cases, randomize_params

TOL = 1e-6


def test_every_registered_layer_has_cases():
    assert set(CASES) == set(nn.REGISTRY)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("tag", "case_id", "factory", "shape"), list(all_cases()), ids=lambda v: str(v))
def test_layer_gradients(tag, case_id, factory, shape, training):
    g = np.random.default_rng(0)
    layer = factory(g).to(np.float64)
    randomize_params(layer, g, statistics=not training)
    errors = check_layer(layer, g.standard_normal(shape), training=training)
    assert max(errors.values()) < TOL, errors


CONV_GRID = list(itertools.product([1, 2, 3], [0, 1, "same"], [1, 2], [1, 3, 5]))


@pytest.mark.parametrize(("stride", "padding", "dilation", "kernel"), CONV_GRID)
def test_conv2d_gradients_grid(stride, padding, dilation, kernel):
    g = np.random.default_rng(1)
    layer = nn.Conv2D(2, 3, kernel, stride=stride, padding=padding, dilation=dilation, rng=g)
    randomize_params(layer, g)
    errors = check_layer(layer, g.standard_normal((2, 2, 11, 10)))
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("kernel,stride,padding",
                         [(2, None, 0), (3, 1, 1), (3, 2, 0), (2, 3, 1), ((3, 2), (1, 2), (1, 0))])
@pytest.mark.parametrize("cls", [nn.MaxPool2D, nn.AvgPool2D])
def test_pool_gradients_grid(cls, kernel, stride, padding):
    g = np.random.default_rng(2)
    errors = check_layer(cls(kernel, stride=stride, padding=padding), g.standard_normal((2, 2, 9, 7)))
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_gradient(smoothing):
    g = np.random.default_rng(3)
    err = check_loss(nn.CrossEntropyLoss(smoothing), g.standard_normal((5, 4)) * 3, g.integers(0, 4, 5))
    assert err < TOL


def test_weighted_cross_entropy_gradient():
    g = np.random.default_rng(6)
    for smoothing in (0.0, 0.1):
        loss = nn.CrossEntropyLoss(smoothing, class_weights=g.uniform(0.2, 3.0, 4))
        assert check_loss(loss, g.standard_normal((5, 4)) * 3, g.integers(0, 4, 5)) < TOL


def test_nll_gradient():
    g = np.random.default_rng(8)
    logp = np.log(np.random.default_rng(9).dirichlet(np.ones(4), 5))
    assert check_loss(nn.NLLLoss(), logp, g.integers(0, 4, 5)) < TOL


@pytest.mark.parametrize("pos_weight", [False, True], ids=["plain", "pos_weight"])
def test_bce_with_logits_gradient(pos_weight):
    """Multi-label: large logits too (softplus keeps both terms finite), several labels set per row."""
    g = np.random.default_rng(10)
    loss = nn.BCEWithLogitsLoss(g.uniform(0.3, 4.0, 4) if pos_weight else None)
    assert check_loss(loss, g.standard_normal((5, 4)) * 6, (g.random((5, 4)) < 0.4).astype(np.uint8)) < TOL


@pytest.mark.parametrize("int_targets", [False, True])
def test_mse_gradient(int_targets):
    g = np.random.default_rng(4)
    targets = g.integers(0, 4, 5) if int_targets else g.standard_normal((5, 4))
    assert check_loss(nn.MSELoss(), g.standard_normal((5, 4)), targets) < TOL


def test_negative_control_wrong_gradient_fails():
    """The checker must catch a wrong backward: a ReLU that lets negative deltas through by half, and a
    convolution that forgot the kernel's rotation; alone, and through the execution plan (which must run a
    subclass's own backward, never the fused one of its base class)."""
    from cnnctl.core.plan import Runner

    class BrokenReLU(nn.ReLU):
        def backward(self, dy):
            return np.where(self._d, dy, 0.5 * dy)

    x = np.random.default_rng(5).standard_normal((3, 4))
    assert check_layer(BrokenReLU(), x)["input"] > 0.1
    model = nn.Model([nn.Dense(4, 4, rng=np.random.default_rng(0)), BrokenReLU()])
    assert check_layer(model, x, runner=Runner(model))["input"] > 0.1

    class BrokenConv(nn.Conv2D):
        def backward(self, dy):
            dx = super().backward(dy)
            self.grads["weight"] = self.grads["weight"][:, :, ::-1, ::-1].copy()  # forgot the rotation
            return dx

    g = np.random.default_rng(6)
    errors = check_layer(BrokenConv(1, 1, 3, rng=g), g.standard_normal((1, 1, 5, 5)))
    assert errors["weight"] > 0.1
    model = nn.Model([BrokenConv(1, 1, 3, rng=g)])
    assert check_layer(model, g.standard_normal((1, 1, 5, 5)), runner=Runner(model))["layers.0.weight"] > 0.1


def _relu_net(g):
    return nn.Model([nn.Dense(3, 4, rng=g), nn.ReLU(), nn.Dense(4, 2, rng=g)])


def test_network_check_skips_kinks_and_says_so():
    """A hidden unit whose ReLU input is exactly 0 for every input: any perturbation of its weights crosses the
    kink, where the central difference is half a slope. Those entries are skipped and counted, the others pass."""
    from cnnctl.tools.gradcheck import check_network

    model = _relu_net(np.random.default_rng(0))
    model.layers[0].params["weight"][0] = 0.0
    model.layers[0].params["bias"][0] = 0.0
    rows = {(r["layer"], r["param"]): r for r in check_network(model, (3,), batch=4, samples=12)}
    weight, bias = rows[("layers.0", "weight")], rows[("layers.0", "bias")]
    assert weight["kinks"] == 3 and weight["checked"] == 9  # unit 0's three weights are kinks, the rest checked
    assert bias["kinks"] == 1 and bias["checked"] == 3
    assert max(r["error"] for r in rows.values()) < TOL


def test_network_check_still_fails_a_wrong_relu_backward(monkeypatch):
    """Negative control for a ReLU network: a backward that passes gradients where the unit was off is wrong at
    smooth points, which are no kinks, so it fails."""
    from cnnctl.tools.gradcheck import check_network

    monkeypatch.setattr(nn.ReLU, "backward", lambda self, dy: dy)  # ignores the mask
    rows = check_network(_relu_net(np.random.default_rng(1)), (3,), batch=8, samples=12)
    assert max(r["error"] for r in rows) > 1e-3
    assert sum(r["kinks"] for r in rows) < sum(r["checked"] for r in rows)


@pytest.mark.parametrize("layer", [nn.ReLU6(), nn.HardSigmoid(), nn.HardSwish(), nn.SiLU()], ids=repr)
def test_hard_activations_across_their_kinks(layer):
    """Inputs spread over -8..8, so that every piece (below -3, between, above 3 and 6) is checked; none lies
    within 1e-3 of a kink, where central differences straddle two pieces."""
    x = np.random.default_rng(5).uniform(-8, 8, (4, 3, 5, 5))
    for kink in (-3.0, 0.0, 3.0, 6.0):
        x[np.abs(x - kink) < 1e-3] += 2e-3
    errors = check_layer(layer, x)
    assert max(errors.values()) < TOL, errors
