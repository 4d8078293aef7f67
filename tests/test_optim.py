"""Optimizers apply torch.optim's update rules: 20 steps on the same gradients agree within 1e-6."""

import numpy as np
import pytest

from cnnctl import nn
from cnnctl.optim import OPTIMIZERS

torch = pytest.importorskip("torch")

SETTINGS = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.1, "momentum": 0.9}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2}),
    ("sgd", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-3}),
    ("adam", {"lr": 1e-2}),
    ("adam", {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 1e-2, "amsgrad": True}),
    ("adamw", {"lr": 1e-2}),
    ("adamw", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    ("rmsprop", {"lr": 1e-2}),
    ("rmsprop", {"lr": 1e-2, "alpha": 0.9, "momentum": 0.5, "centered": True, "weight_decay": 1e-2}),
    ("adagrad", {"lr": 1e-1}),
    ("adagrad", {"lr": 1e-1, "lr_decay": 0.05, "weight_decay": 1e-2, "initial_accumulator_value": 0.1, "eps": 1e-8}),
    ("adadelta", {}),
    ("adadelta", {"lr": 0.5, "rho": 0.8, "eps": 1e-5, "weight_decay": 1e-2}),
]
TORCH = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "adagrad": "Adagrad",
         "adadelta": "Adadelta"}


def test_every_optimizer_has_torch_settings():
    assert {tag for tag, _ in SETTINGS} == set(OPTIMIZERS) == set(TORCH)


def small_model(g):
    return nn.Model([nn.Conv2D(1, 2, 3, rng=g), nn.BatchNorm2D(2), nn.Flatten(), nn.Dense(18, 3, rng=g)]).to(
        np.float64
    )


@pytest.mark.parametrize(("tag", "kwargs"), SETTINGS, ids=lambda v: str(v))
def test_optimizer_matches_torch_over_20_steps(tag, kwargs):
    g = np.random.default_rng(0)
    model = small_model(g)
    names = [name for name, _, _ in model.parameters()]
    tparams = [torch.tensor(layer.params[key].copy(), requires_grad=True) for _, layer, key in model.parameters()]
    opt = OPTIMIZERS[tag](model, **kwargs)
    topt = getattr(torch.optim, TORCH[tag])(tparams, **kwargs)
    for _ in range(20):
        for (_, layer, key), tp in zip(model.parameters(), tparams):
            grad = g.standard_normal(layer.params[key].shape)
            layer.grads[key] = grad
            tp.grad = torch.tensor(grad)
        opt.step()
        topt.step()
    for name, (_, layer, key), tp in zip(names, model.parameters(), tparams):
        np.testing.assert_allclose(layer.params[key], tp.detach().numpy(), rtol=1e-6, atol=1e-6, err_msg=name)


def test_no_decay_on_bias_and_norm_when_asked():
    g = np.random.default_rng(1)
    model = small_model(g)
    before = {name: layer.params[key].copy() for name, layer, key in model.parameters()}
    opt = OPTIMIZERS["sgd"](model, lr=0.1, weight_decay=0.5, decay_bias_and_norm=False)
    model.zero_grad()
    opt.step()
    for name, layer, key in model.parameters():
        exempt = key == "bias" or layer.tag == "batchnorm2d"
        assert np.array_equal(layer.params[key], before[name]) == exempt, name


def test_state_dict_round_trip_continues_identically():
    g = np.random.default_rng(2)
    a, b = small_model(g), None
    b = small_model(np.random.default_rng(2))
    b.load_state_dict(a.state_dict())
    oa, ob = OPTIMIZERS["adam"](a, lr=0.01), OPTIMIZERS["adam"](b, lr=0.01)
    grads = [np.random.default_rng(i).standard_normal(layer.params[key].shape)
             for i, (_, layer, key) in enumerate(a.parameters())]
    for model, opt in ((a, oa), (b, ob)):
        for grad, (_, layer, key) in zip(grads, model.parameters()):
            layer.grads[key] = grad
        opt.step()
    ob.load_state_dict({k: v.copy() for k, v in oa.state_dict().items()})
    for model, opt in ((a, oa), (b, ob)):
        for grad, (_, layer, key) in zip(grads, model.parameters()):
            layer.grads[key] = grad
        opt.step()
    for (_, la, ka), (_, lb, kb) in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(la.params[ka], lb.params[kb])


@pytest.mark.parametrize("tag", sorted(OPTIMIZERS))
def test_training_stays_float32(tag):
    """No silent float64 upcasts anywhere in a training step: outputs, gradients, parameters, optimizer state."""
    g = np.random.default_rng(3)
    model = nn.Model([nn.Conv2D(1, 3, 3, padding=1, activation="relu", rng=g), nn.BatchNorm2D(3),
                           nn.MaxPool2D(2), nn.AvgPool2D(2, stride=1), nn.Flatten(), nn.Dropout(0.1, rng=g),
                           nn.Dense(27, 8, activation="tanh", rng=g), nn.Dense(8, 3, rng=g)])
    momentum, amsgrad = {"momentum": 0.9, "weight_decay": 1e-3}, {"weight_decay": 1e-3, "amsgrad": True}
    kwargs = {"sgd": momentum, "rmsprop": momentum, "adam": amsgrad, "adamw": amsgrad}.get(tag, {"weight_decay": 1e-3})
    opt = OPTIMIZERS[tag](model, lr=0.01, **kwargs)
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    x = g.standard_normal((4, 1, 8, 8)).astype(np.float32)
    for _ in range(3):
        out = model.forward(x)
        assert out.dtype == np.float32
        loss.forward(out, np.array([0, 1, 2, 0]))
        model.backward(loss.backward())
        opt.step()
    arrays = [layer.params[k] for _, layer, k in model.parameters()] + \
             [layer.grads[k] for _, layer, k in model.parameters()] + \
             [v for k, v in opt.state_dict().items() if k != "steps"]
    assert all(a.dtype == np.float32 for a in arrays), {a.dtype for a in arrays}
    assert all(v.dtype == np.float32 for layer in model.layers for k, v in layer.buffers.items()
               if k != "num_batches_tracked")
