"""Gradient checking by central differences, for layers and losses (run in float64).

A layer is checked through the scalar L = sum(forward(x) * R) for a fixed random R, so dL/dy = R and
backward(R) must equal the numerical dL/dx and dL/dparams. Layers that draw random numbers while
training (Dropout) get a freshly seeded Generator before every forward, so each evaluation sees the same mask.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cnnctl.config.build import LayerRow, activation_values, build_model
from cnnctl.config.spec import Spec
from cnnctl.core.memory import refuse_over
from cnnctl.core.nn.base import Layer
from cnnctl.core.nn.losses import Loss
from cnnctl.core.plan import Runner
from cnnctl.errors import CnnctlError


def nudged(f: Callable[[], float], flat: np.ndarray, i: int, eps: float) -> tuple[float, float]:
    """f with flat[i] raised and lowered by eps (in place, restored after): the two values of a central
    difference."""
    orig = flat[i]
    flat[i] = orig + eps
    fp = f()
    flat[i] = orig - eps
    fm = f()
    flat[i] = orig
    return fp, fm


def numerical_grad(f: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """dF/dx by central differences, perturbing x in place one element at a time."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        fp, fm = nudged(f, flat, i, eps)
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


def check_layer(layer: Layer, x: np.ndarray, training: bool = True, seed: int = 0,
                runner: Runner | None = None) -> dict[str, float]:
    """Relative errors of backward's input and parameter gradients against central differences; with `runner`
    (a plan.Runner of the layer, a model) run as training runs it, through the execution plan."""
    layer.to(np.float64)
    x = x.astype(np.float64)
    layer.set_input_grad(True)
    net = runner or layer

    def run(inp):
        _reseed(layer, seed)
        return net.forward(inp, training)

    r = np.random.default_rng(seed + 1).standard_normal(run(x).shape)
    run(x)
    dx = net.backward(r)
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


EPS = 1e-6  # the perturbation of central differences (float64)
# one-sided slopes of a smooth L differ by about EPS * L'' (1e-6 for unit curvature); by more than this, the
# perturbation crossed a point where L is not differentiable
KINK = 1e-4


def check_network(model, input_shape, batch: int = 2, samples: int = 16, seed: int = 0,
                  only: set[int] | None = None, tol: float = 1e-6, progress=None) -> list[dict]:
    """Every parameter gradient of the network (through any nesting) and its input gradient, against central
    differences of L = sum(net(x) * R), in float64, on up to `samples` random entries per array. `only`:
    indices of top-level layers to check (0 includes the input).

    Kinks: where a perturbation of +-EPS crosses a point at which L is not differentiable (a ReLU input or a
    max-pooling tie within reach; with batchnorm one entry moves every activation of its channel), the central
    difference mixes two slopes and disagrees with backprop although backprop is right. Caffe's checker skips such
    entries. At a crossing backprop gives the slope on its own side, so the two one-sided differences disagree by
    about twice the central difference's error; at a smooth point they agree to about EPS * L''. An entry whose
    error reaches `tol` is therefore a kink when its one-sided differences disagree by more than 1.5 times that
    error, or by more than a smooth L allows at all (KINK): it is skipped, counted in the row's `kinks`, and
    another entry is drawn (up to 4 x samples tries). A wrong backward at a smooth point still fails: there the
    one-sided differences agree with the central one, whatever the error. `progress(done,
    total)` is called after each array."""
    model.to(np.float64)
    model.set_input_grad(True)
    g = np.random.default_rng(seed)
    x = g.standard_normal((batch, *input_shape))
    runner = Runner(model)  # what training runs: the execution plan

    def run():
        _reseed(model, seed)
        return runner.forward(x, training=True)

    r = g.standard_normal(run().shape)
    run()
    dx = runner.backward(r)
    params = list(model.parameters())
    analytic = {p.name: p.grad.copy() for p in params}

    def loss():
        return float((run() * r).sum())

    base = loss()

    def sampled(arr, grad):
        flat, gflat = arr.reshape(-1), grad.reshape(-1)
        wanted = min(samples, arr.size)
        errors, kinks = [], 0
        for i in g.permutation(arr.size)[: 4 * wanted]:
            if len(errors) == wanted:
                break
            fp, fm = nudged(loss, flat, i, EPS)
            err = rel_error(gflat[i], (fp - fm) / (2 * EPS))
            forward, backward = (fp - base) / EPS, (base - fm) / EPS
            apart = rel_error(forward, backward)
            if err >= tol and (apart > KINK or apart > 1.5 * err):
                kinks += 1
                continue
            errors.append(err)
        return max(errors, default=0.0), len(errors), kinks

    arrays = []
    if only is None or 0 in only:
        arrays.append((None, "input", "input", x, dx))
    for p in params:
        _, index, *inner = p.name.split(".")  # layers.{index}[.body.0].{key}
        index = int(index)
        if only is None or index in only:
            arrays.append((index, p.name.rsplit(".", 1)[0], p.key, p.value, analytic[p.name]))  # layers.3.body.0
    rows = []
    for k, (index, layer, param, value, grad) in enumerate(arrays):
        err, n, kinks = sampled(value, grad)
        rows.append({"index": index, "layer": layer, "param": param, "shape": list(value.shape), "checked": n,
                     "kinks": kinks, "error": err})
        if progress:
            progress(k + 1, len(arrays))
    return rows


def chosen_layers(rows: list[LayerRow], layers: list[str]) -> set[int] | None:
    """Top-level layer indices from --layers items: an index, a state-dict prefix (layers.6) or a name (dense_6);
    None (all) for no items."""
    if not layers:
        return None
    by_name = {**{r.path: r.index for r in rows}, **{r.name: r.index for r in rows}}
    only = set()
    for item in layers:
        if item.isascii() and item.isdigit() and int(item) < len(rows):
            only.add(int(item))
        elif item in by_name:
            only.add(by_name[item])
        else:
            raise CnnctlError(f"--layers {item!r}: no such layer", f"use an index 0..{len(rows) - 1} or one "
                              f"of: {', '.join(by_name)}")
    return only


def gradcheck(spec: Spec, rows: list[LayerRow], layers: list[str], samples: int = 16, batch: int = 2,
              tol: float = 1e-6, seed: int = 0, progress=None) -> list[dict]:
    """`cnnctl gradcheck`: the network of spec, freshly drawn from seed, checked by check_network on the layers
    named (all by default), once its float64 batch is known to fit in memory."""
    # float64 activations, their gradients and what backward keeps, for every input of the batch
    refuse_over(f"gradcheck of {spec.name} at --batch {batch}", 8 * 4 * batch * activation_values(rows), 2,
                CnnctlError, "use a smaller --batch (the default 2 is enough to check the backprop)")
    model, rows = build_model(spec.model, np.random.default_rng(seed))
    only = chosen_layers(rows, layers)
    if not tol > 0:  # NaN or <= 0 would make every row fail, or none
        raise CnnctlError(f"--tol {tol}: give a positive number", "e.g. --tol 1e-6")
    return check_network(model, spec.model.input_shape, batch, samples, seed, only, tol, progress)
