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
    """max |a - b| scaled by the larger magnitude of the two (0 when both are zero)."""
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0))
    return 0.0 if scale == 0 else float(np.abs(a - b).max() / scale)


def check_layer(layer: Layer, x: np.ndarray, training: bool = True, seed: int = 0) -> dict[str, float]:
    """Relative errors of backward's input and parameter gradients against central differences."""
    layer.to(np.float64)
    x = x.astype(np.float64)
    if hasattr(layer, "needs_input_grad"):
        layer.needs_input_grad = True

    def run(inp):
        if hasattr(layer, "rng"):
            layer.rng = np.random.default_rng(seed)
        return layer.forward(inp, training)

    r = np.random.default_rng(seed + 1).standard_normal(run(x).shape)
    run(x)
    dx = layer.backward(r)
    analytic = {"input": dx, **{k: g.copy() for k, g in layer.grads.items()}}

    def loss():
        return float((run(x) * r).sum())

    errors = {"input": rel_error(analytic["input"], numerical_grad(loss, x))}
    for key, p in layer.params.items():
        errors[key] = rel_error(analytic[key], numerical_grad(loss, p))
    return errors


def check_loss(loss: Loss, outputs: np.ndarray, targets: np.ndarray) -> float:
    """Relative error of loss.backward() against central differences of loss.forward()."""
    outputs = outputs.astype(np.float64)
    loss.forward(outputs, targets)
    analytic = loss.backward().copy()
    return rel_error(analytic, numerical_grad(lambda: loss.forward(outputs, targets), outputs))


def check_network(model, input_shape, batch: int = 2, samples: int = 16, seed: int = 0,
                  only: set[int] | None = None) -> list[dict]:
    """Every layer's parameter gradients (and the input gradient) inside the whole network, against central
    differences of L = sum(net(x) * R), in float64, on up to `samples` random entries per array."""
    model.to(np.float64)
    first = model.layers[0]
    if hasattr(first, "needs_input_grad"):
        first.needs_input_grad = True
    g = np.random.default_rng(seed)
    x = g.standard_normal((batch, *input_shape))

    def run():
        for layer in model.layers:
            if hasattr(layer, "rng"):
                layer.rng = np.random.default_rng(seed)
        return model.forward(x, training=True)

    r = g.standard_normal(run().shape)
    run()
    dx = model.backward(r)
    analytic = {i: {k: v.copy() for k, v in layer.grads.items()} for i, layer in enumerate(model.layers)}

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
    for i, layer in enumerate(model.layers):
        if only is not None and i not in only:
            continue
        for key, p in layer.params.items():
            err, n = sampled(p, analytic[i][key])
            rows.append({"index": i, "layer": model.names[i], "param": key, "shape": list(p.shape), "checked": n,
                         "error": err})
    return rows
