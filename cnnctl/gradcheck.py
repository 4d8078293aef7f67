"""Gradient checking by central differences, for layers and losses (run in float64).

A layer is checked through the scalar L = sum(forward(x) * R) for a fixed random R, so dL/dy = R and
backward(R) must equal the numerical dL/dx and dL/dparams. Layers that draw random numbers while
training (Dropout) get a freshly seeded Generator before every forward, so each evaluation sees the same mask.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .nn.base import Layer
from .nn.losses import Loss


def numerical_grad(f: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """dF/dx by central differences, perturbing x in place one element at a time."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        flat[i] = orig + eps
        fp = f()
        flat[i] = orig - eps
        fm = f()
        flat[i] = orig
        gflat[i] = (fp - fm) / (2 * eps)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """The largest element-wise |a - b| / max(|a|, |b|, 1), as Caffe's gradient checker scales it: relative
    for large values, absolute below 1, so a small entry cannot hide behind a large one."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float((np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1.0)).max())


def _reseed(layer: Layer, seed: int) -> None:
    """Fresh generators for every layer that draws random numbers (Dropout), so each evaluation is the same."""
    for _, sub in layer.named_layers():
        if hasattr(sub, "rng"):
            sub.rng = np.random.default_rng(seed)


def check_layer(layer: Layer, x: np.ndarray, training: bool = True, seed: int = 0) -> dict[str, float]:
    """Relative errors of backward's input and parameter gradients against central differences."""
    layer.to(np.float64)
    x = x.astype(np.float64)
    layer.set_input_grad(True)

    def run(inp):
        _reseed(layer, seed)
        return layer.forward(inp, training)

    r = np.random.default_rng(seed + 1).standard_normal(run(x).shape)
    run(x)
    dx = layer.backward(r)
    analytic = {"input": dx, **{p.name: p.grad.copy() for p in layer.parameters()}}

    def loss():
        return float((run(x) * r).sum())

    errors = {"input": rel_error(analytic["input"], numerical_grad(loss, x))}
    for p in layer.parameters():
        errors[p.name] = rel_error(analytic[p.name], numerical_grad(loss, p.value))
    return errors


def check_loss(loss: Loss, outputs: np.ndarray, targets: np.ndarray) -> float:
    """Relative error of loss.backward() against central differences of loss.forward()."""
    outputs = outputs.astype(np.float64)
    loss.forward(outputs, targets)
    analytic = loss.backward().copy()
    return rel_error(analytic, numerical_grad(lambda: loss.forward(outputs, targets), outputs))


def check_network(model, input_shape, batch: int = 2, samples: int = 16, seed: int = 0,
                  only: set[int] | None = None) -> list[dict]:
    """Every parameter gradient of the network (through any nesting) and its input gradient, against central
    differences of L = sum(net(x) * R), in float64, on up to `samples` random entries per array. `only`:
    indices of top-level layers to check (0 includes the input)."""
    model.to(np.float64)
    model.set_input_grad(True)
    g = np.random.default_rng(seed)
    x = g.standard_normal((batch, *input_shape))

    def run():
        _reseed(model, seed)
        return model.forward(x, training=True)

    r = g.standard_normal(run().shape)
    run()
    dx = model.backward(r)
    params = list(model.parameters())
    analytic = {p.name: p.grad.copy() for p in params}

    def loss():
        return float((run() * r).sum())

    def sampled(arr, grad):
        idx = g.choice(arr.size, min(samples, arr.size), replace=False)
        numeric = np.zeros(len(idx))
        flat = arr.reshape(-1)
        for n, i in enumerate(idx):
            orig = flat[i]
            flat[i] = orig + 1e-6
            fp = loss()
            flat[i] = orig - 1e-6
            fm = loss()
            flat[i] = orig
            numeric[n] = (fp - fm) / 2e-6
        return rel_error(grad.reshape(-1)[idx], numeric), len(idx)

    rows = []
    if only is None or 0 in only:
        err, n = sampled(x, dx)
        rows.append({"index": None, "layer": "input", "param": "input", "shape": list(x.shape), "checked": n,
                     "error": err})
    for p in params:
        _, index, *inner = p.name.split(".")  # layers.{index}[.body.0].{key}
        index = int(index)
        if only is not None and index not in only:
            continue
        err, n = sampled(p.value, analytic[p.name])
        layer = ".".join([model.names[index], *inner[:-1]])
        rows.append({"index": index, "layer": layer, "param": p.key, "shape": list(p.value.shape),
                     "checked": n, "error": err})
    return rows
