"""The execution plan decides by what layers declare, never by their class: a subclass computes through the plan what
it computes alone; plan.py names no layer class; a new element-wise activation is one class, fused like ReLU; a new
optimizer is one class, its config keys made from its constructor."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from cnnctl.core import nn, optim
from cnnctl.core.nn.activations import Elementwise
from cnnctl.core.plan import Runner
from cnnctl.tools.gradcheck import check_layer
from tests.cases import all_cases, basic_block, randomize_params
from tests.helpers import invoke

ROOT = Path(__file__).resolve().parents[1]
CASES = [pytest.param(factory, shape, id=f"{tag}-{case_id}") for tag, case_id, factory, shape in all_cases()]


def _doubled(layer):
    """The layer, made an instance of a subclass of its own class that doubles its output (forward) and so the
    gradient it passes on (backward): a subclass that rewrites the math its class declared to the plan."""
    base = type(layer)

    def forward(self, x, training=True):
        return 2 * base.forward(self, x, training)

    def backward(self, dy):
        return base.backward(self, 2 * dy)

    layer.__class__ = type(f"Doubled{base.__name__}", (base,), {"forward": forward, "backward": backward})
    return layer


def _reseed(layer):
    for _, sub in layer.named_layers():
        if hasattr(sub, "rng"):
            sub.rng = np.random.default_rng(9)


def _pass(factory, shape, doubled: bool, planned: bool):
    """Output, input gradient and parameter gradients of one training pass, float64."""
    layer = factory(np.random.default_rng(0)).to(np.float64)
    randomize_params(layer, np.random.default_rng(1))
    if doubled:
        _doubled(layer)
    g = np.random.default_rng(2)
    x = g.standard_normal(shape)
    _reseed(layer)
    if planned:
        model = nn.Model([layer])
        model.set_input_grad(True)
        net = Runner(model)
    else:
        layer.set_input_grad(True)
        net = layer
    y = net.forward(x, True)
    dx = net.backward(np.random.default_rng(3).standard_normal(y.shape))
    return [y, dx] + [p.grad.copy() for p in layer.parameters()]


@pytest.mark.parametrize("factory,shape", CASES)
def test_a_subclass_of_any_layer_computes_the_same_through_the_plan_as_alone(factory, shape):
    """Every registered layer case, subclassed to double its output: through the plan, exactly what it gives
    alone, and twice what the class itself gives (the plan never puts the base class's fused math in its place)."""
    alone = _pass(factory, shape, doubled=True, planned=False)
    planned = _pass(factory, shape, doubled=True, planned=True)
    plain = _pass(factory, shape, doubled=False, planned=True)
    for a, b in zip(alone, planned):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(planned[0], 2 * plain[0], rtol=1e-12, atol=1e-12)


def _alone_equals_planned(spec, batch: int, tol: float, algorithms=None, randomized=False):
    """The model of `spec`, float64, run through the plan and as its layers alone in a plain sequence: output,
    input gradient and every parameter's gradient equal within tol. Returns the model."""
    from cnnctl.config.build import build_model

    results = []
    for planned in (False, True):
        model, _ = build_model(spec, np.random.default_rng(0))
        model = model.to(np.float64)
        if randomized:
            randomize_params(model, np.random.default_rng(4))
        model.set_input_grad(True)
        net = Runner(model, algorithms=algorithms) if planned else nn.Sequential(model.layers)
        x = np.random.default_rng(1).standard_normal((batch, *spec.input_shape))
        y = net.forward(x, True)
        dx = net.backward(np.random.default_rng(2).standard_normal(y.shape))
        results.append([y, dx] + [p.grad.copy() for p in model.parameters()])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
    return model


def test_a_gate_is_a_join_whose_activation_after_it_is_fused():
    """Squeeze-and-excitation through the plan: the branch as its own steps, x * g joined with the ReLU after it
    fused (one step, which keeps x, g and the ReLU's mask), and the numbers of the layers run alone."""
    from cnnctl.config.spec import ModelSpec

    spec = ModelSpec.model_validate({"input_shape": [4, 6, 6], "layers": [
        {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1},
        {"type": "gate", "branch": [{"type": "global_avgpool2d"}, {"type": "dense", "units": 2, "activation": "relu"},
                                    {"type": "dense", "units": 4, "activation": "sigmoid"}]},
        {"type": "relu"}, {"type": "flatten"}, {"type": "dense", "units": 3}]})
    model = _alone_equals_planned(spec, 8, tol=1e-12)
    rows = Runner(model).plan((4, 6, 6)).describe(8)
    join = next(r for r in rows if r["kind"] == "join")
    assert join["fused"] == "relu layers.2" and join["saved_bytes"] == (4 * 6 * 6 + 4) * 8 * 4 + 4 * 6 * 6 * 8
    assert [r["kind"] for r in rows].count("dense") == 3  # the branch's two dense layers are steps of their own


@pytest.mark.parametrize("algorithm,kernel", [("lowering", 3), ("pointwise", 1), ("winograd2", 3), ("winograd4", 3)])
@pytest.mark.parametrize("conv_bias,scale_bias", [(True, True), (False, True), (True, False), (False, False)])
def test_a_scale_after_a_convolution_runs_as_one_product_with_the_numbers_of_both(algorithm, kernel, conv_bias,
                                                                                    scale_bias):
    """conv2d then scale (then ReLU) through the plan: one step, the scale folded into the convolution's weight and
    bias, the ReLU its epilogue; output, input gradient and every parameter's gradient (the scale's too) those of
    the layers run alone, float64, by every convolution algorithm."""
    from cnnctl.config.spec import ModelSpec

    spec = ModelSpec.model_validate({"input_shape": [3, 8, 8], "layers": [
        {"type": "conv2d", "filters": 5, "kernel_size": kernel, "padding": kernel // 2, "bias": conv_bias},
        {"type": "scale", "bias": scale_bias}, {"type": "relu"}, {"type": "flatten"}, {"type": "dense", "units": 3}]})
    model = _alone_equals_planned(spec, 6, tol=1e-10, algorithms={"layers.0": algorithm}, randomized=True)
    rows = Runner(model, algorithms={"layers.0": algorithm}).plan((3, 8, 8)).describe(6)
    assert [r["kind"] for r in rows] == ["conv", "flatten", "dense"]
    assert rows[0]["algorithm"] == algorithm
    assert rows[0]["fused"] == ", ".join([*(["bias"] if conv_bias else []), "scale layers.1", "relu layers.2"])


@pytest.mark.parametrize("algorithm,kernel", [("lowering", 3), ("pointwise", 1), ("winograd2", 3)])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_a_channel_shuffle_and_scales_after_a_convolution_fold_into_its_filters(algorithm, kernel, conv_bias):
    """conv2d, scale, channel_shuffle, scale (no bias) through the plan: one product whose filters are scaled,
    shuffled and scaled again; every number of the layers run alone, float64."""
    from cnnctl.config.spec import ModelSpec

    spec = ModelSpec.model_validate({"input_shape": [3, 8, 8], "layers": [
        {"type": "conv2d", "filters": 6, "kernel_size": kernel, "padding": kernel // 2, "bias": conv_bias},
        {"type": "scale"}, {"type": "channel_shuffle", "groups": 3}, {"type": "scale", "bias": False},
        {"type": "flatten"}, {"type": "dense", "units": 3}]})
    model = _alone_equals_planned(spec, 4, tol=1e-10, algorithms={"layers.0": algorithm}, randomized=True)
    rows = Runner(model, algorithms={"layers.0": algorithm}).plan((3, 8, 8)).describe(4)
    assert [r["kind"] for r in rows] == ["conv", "flatten", "dense"]
    assert rows[0]["fused"].endswith("scale layers.1, channel_shuffle layers.2, scale layers.3")


def test_a_scale_is_not_folded_across_an_activation_a_hook_or_a_second_reader():
    """Folding is exact only for the convolution's own output: a scale after the convolution's activation, a
    convolution whose output a hook watches, stay steps of their own."""
    from cnnctl.config.build import build_model
    from cnnctl.config.spec import ModelSpec

    spec = ModelSpec.model_validate({"input_shape": [3, 6, 6], "layers": [
        {"type": "conv2d", "filters": 4, "kernel_size": 3, "activation": "relu"}, {"type": "scale"},
        {"type": "conv2d", "filters": 4, "kernel_size": 3}, {"type": "scale"}]})
    model, _ = build_model(spec, np.random.default_rng(0))
    kinds = [r["kind"] for r in Runner(model).plan((3, 6, 6)).describe(2)]
    assert kinds == ["conv", "scale", "conv"]
    model.layers[2].add_forward_hook(lambda layer, y: None)
    kinds = [r["kind"] for r in Runner(model).plan((3, 6, 6)).describe(2)]
    assert kinds == ["conv", "scale", "conv", "scale"]


def test_a_frozen_convolution_keeps_the_scale_that_trains_after_it_a_step_of_its_own():
    """Fine-tuning a scale after a frozen convolution: the convolution runs forward only, the scale gets its
    gradient (folded into the frozen step it would get none)."""
    from cnnctl.config.build import build_model
    from cnnctl.config.spec import ModelSpec

    spec = ModelSpec.model_validate({"input_shape": [3, 6, 6], "layers": [
        {"type": "conv2d", "filters": 4, "kernel_size": 3}, {"type": "scale"}, {"type": "flatten"},
        {"type": "dense", "units": 2}]})
    model, _ = build_model(spec, np.random.default_rng(0))
    model.layers[0].freeze()
    model.set_input_grad(False)
    net = Runner(model)
    y = net.forward(np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32), True)
    net.backward(np.ones_like(y))
    rows = net.plan((3, 6, 6)).describe(2)
    assert [(r["kind"], r["forward_only"]) for r in rows][:2] == [("conv", True), ("scale", False)]
    assert np.abs(model.layers[1].grads["weight"]).sum() > 0


class ReLU6ByHand(nn.ReLU):
    """A ReLU6 written as a ReLU subclass with its own forward and backward (the issue's example)."""

    def forward(self, x, training=True):
        self._inside = (x > 0) & (x < 6)
        return np.clip(x, 0, 6)

    def backward(self, dy):
        return dy * self._inside


class ReLU6ByFunction(nn.ReLU):
    """A ReLU6 written the way the plan can fuse: its element-wise function and derivative."""

    monotone = True

    def elementwise(self, x, y, d):
        np.logical_and(x > 0, x < 6, out=d)
        np.clip(x, 0, 6, out=y)


@pytest.mark.parametrize("relu6", [ReLU6ByHand, ReLU6ByFunction])
def test_a_relu6_subclass_of_relu_is_a_relu6_through_the_plan(relu6):
    """As a convolution's activation before max pooling (where a ReLU is fused and moved), as a layer after a
    convolution (where an element-wise layer is absorbed), and as a residual unit's: never above 6, equal to the
    layers run one by one, and fused only when written as an element-wise function."""
    g = np.random.default_rng(4)
    conv = nn.Conv2D(2, 4, 3, padding=1, rng=g, dtype=np.float64)
    conv.activation = relu6()
    body = nn.Sequential([nn.Conv2D(4, 4, 3, padding=1, rng=g, dtype=np.float64)])
    unit = nn.Residual(body)
    unit.activation = relu6()
    layers = [conv, nn.MaxPool2D(2), nn.Conv2D(4, 4, 1, rng=g, dtype=np.float64), relu6(), unit]
    model = nn.Model(layers)
    for p in model.parameters():
        p.layer.params[p.key] = p.value * 20  # large outputs: a ReLU in place of the ReLU6 would show
    x = g.standard_normal((3, 2, 6, 6))
    model.set_input_grad(True)
    run = Runner(model)
    y = run.forward(x, True)
    assert y.max() <= 6.0 and (y == 6.0).any()
    h = x
    for layer in layers:
        h = layer(h, True)
    np.testing.assert_allclose(y, h, rtol=1e-12, atol=1e-12)
    fused = " ".join(f for s in run.plan(x.shape[1:], x.dtype).steps for f in s.fused)
    assert ("relu" in fused) == (relu6 is ReLU6ByFunction)
    assert max(check_layer(model, x, runner=run).values()) < 1e-6


class Softsign(Elementwise):
    """x / (1 + |x|): a new element-wise activation written in this test alone."""

    tag = "softsign"
    monotone = True

    def elementwise(self, x, y, d):
        a = 1 + np.abs(x)
        np.divide(1, a * a, out=d)
        np.divide(x, a, out=y)


def test_a_new_element_wise_activation_is_fused_like_relu_with_no_other_change():
    """A convolution's activation (fused, and moved behind max pooling: it never decreases), a layer after a
    convolution (absorbed into its epilogue), a residual unit's (fused into the add): the plan says so, and the
    planned model equals its layers one by one and passes central differences."""
    g = np.random.default_rng(5)
    conv = nn.Conv2D(2, 4, 3, padding=1, rng=g, dtype=np.float64)
    conv.activation = Softsign()
    unit = basic_block(g, 4, 4, 1).to(np.float64)
    unit.activation = Softsign()
    layers = [conv, nn.MaxPool2D(2), nn.Conv2D(4, 4, 3, padding=1, rng=g, dtype=np.float64), Softsign(), unit,
              nn.GlobalAvgPool2D(), nn.Dense(4, 3, rng=g, dtype=np.float64)]
    model = nn.Model(layers)
    randomize_params(model, g)
    run = Runner(model)
    x = g.standard_normal((3, 2, 6, 6))
    steps = {s.name: s for s in run.plan(x.shape[1:], x.dtype).steps}
    assert steps["layers.1"].fused == ["softsign of layers.0"]
    assert steps["layers.2"].fused == ["bias", "softsign layers.3"] and "layers.3" not in steps
    assert steps["layers.4"].kind == "join" and steps["layers.4"].fused == ["softsign"]
    h = x
    for layer in layers:
        h = layer(h, True)
    np.testing.assert_allclose(run.forward(x, True), h, rtol=1e-12, atol=1e-12)
    assert max(check_layer(model, x, runner=run).values()) < 1e-6


def test_bench_plan_shows_gelu_and_silu_fused(tiny_config):
    """`cnnctl bench --plan`: GELU and SiLU run in their convolution's epilogue, as ReLU does."""
    for act in ("gelu", "silu", "hardswish"):
        res = json.loads(invoke("bench", tiny_config, "--steps", "1", "--warmup", "0", "--plan", "--json",
                                "--set", f"model.layers.0.activation={act}").output)
        conv = res["plan_steps"][0]
        assert conv["kind"] == "conv" and conv["fused"] == f"bias, {act}"
        assert res["plan_steps"][1]["fused"] == ""  # not monotone: it stays before the pooling


def test_plan_py_names_no_layer_class():
    """plan.py decides by capability: no registered layer class (nor nn's modules' classes) appears in it."""
    tree = ast.parse((ROOT / "src" / "cnnctl" / "core" / "plan.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    layer_classes = {cls.__name__ for cls in nn.REGISTRY.values()} | {"Elementwise", "Model", "Sequential"}
    assert not names & layer_classes, names & layer_classes
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported & {"nn.conv", "nn.activations", "nn.graph", "nn.model", "nn.pooling"} == set()


def test_the_layers_hold_no_execution_state():
    """Speed lives in the plan: after a forward and backward alone, no layer of any registered case holds
    scratch buffers, thread or plan state, or process shares (only what its backward reads)."""
    words = ("buffer", "scratch", "plan", "pool", "thread", "part", "keep", "cache")
    for _, _, factory, shape in all_cases():
        layer = factory(np.random.default_rng(0))
        layer.set_input_grad(True)
        y = layer.forward(np.random.default_rng(1).standard_normal(shape).astype(np.float32), True)
        layer.backward(np.ones_like(y))
        for name, sub in layer.named_layers():
            held = [k for k in vars(sub) if any(w in k.lower() for w in words) and k != "buffers"]
            assert not held, (type(sub).__name__, name, held)


def test_an_optimizer_spec_is_made_from_its_constructor():
    """Every registered optimizer's config keys are its constructor's arguments, with the same defaults; the
    constraints come from the annotations; a new optimizer class registers its spec by itself."""
    import inspect

    for tag, cls in optim.OPTIMIZERS.items():
        params = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                  if k not in ("self", "model")}
        spec = optim.OPTIMIZER_SPECS[tag]
        assert [k for k in spec.model_fields if k not in ("type", "groups", "lookahead")] == list(params), tag
        made = spec(type=tag)
        assert {k: getattr(made, k) for k in params} == params, tag
    with pytest.raises(ValueError, match="greater than 0"):
        optim.OPTIMIZER_SPECS["sgd"].model_validate({"type": "sgd", "lr": 0})
    before = (dict(optim.OPTIMIZERS), dict(optim.OPTIMIZER_SPECS))
    try:
        @optim.register_optimizer("signsgd")
        class SignSGD(optim.Optimizer):
            """p -= lr * sign(g)."""

            def __init__(self, model, lr: optim.Rate = 0.001, weight_decay: optim.Decay = 0.0,
                         decay_bias_and_norm: bool = True):
                super().__init__(model, lr, weight_decay, decay_bias_and_norm)

            def update(self, p, g, st, lr):  # weight decay is already in g (Optimizer.step)
                return p - lr * np.sign(g)

        spec = optim.OPTIMIZER_SPECS["signsgd"].model_validate({"type": "signsgd", "lr": 0.5})
        model = nn.Model([nn.Dense(2, 2, rng=np.random.default_rng(0))])
        opt = spec.build(model)
        w = model.layers[0].params["weight"].copy()
        model.layers[0].grads["weight"] = np.array([[1.0, -2.0], [0.0, 3.0]], np.float32)
        opt.step()
        np.testing.assert_allclose(model.layers[0].params["weight"], w - 0.5 * np.array([[1, -1], [0, 1]]))
    finally:
        optim.OPTIMIZERS.clear()
        optim.OPTIMIZERS.update(before[0])
        optim.OPTIMIZER_SPECS.clear()
        optim.OPTIMIZER_SPECS.update(before[1])


def test_an_unknown_convolution_algorithm_is_refused_not_replaced():
    """A name that no registered algorithm has is an error (never a silent lowering), from the registry, from a
    plan's choices and from a checkpoint's recorded plan, whose validation needs no plan module."""
    import sys

    from cnnctl.core import convolution, plan
    from cnnctl.errors import CnnctlError
    from cnnctl.run import checkpoint

    with pytest.raises(CnnctlError, match="unknown convolution algorithm 'fft'"):
        convolution.get("fft")
    model = nn.Model([nn.Conv2D(1, 2, 3, rng=np.random.default_rng(0))])
    with pytest.raises(CnnctlError, match="unknown convolution algorithm 'fft'"):
        plan.Plan(model, (1, 5, 5), {"layers.0": "fft"})
    with pytest.raises(ValueError):
        checkpoint.RunState.model_validate({"algorithms": {"layers.0": "fft"}})
    assert checkpoint.RunState.model_validate({"algorithms": {"layers.0": "winograd2"}}).algorithms
    code = "import sys, cnnctl.run.checkpoint; print('cnnctl.core.plan' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
