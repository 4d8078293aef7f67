"""The execution plan: every convolution algorithm against naive loops, central differences (float64) and
PyTorch (float32); a planned model equals its layers run one by one, for every registered layer case."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from cnnctl.core import convolution, nn, plan, winograd
from cnnctl.core.plan import Runner
from cnnctl.errors import CnnctlWarning
from cnnctl.tools.gradcheck import check_layer, rel_error
from tests.cases import all_cases, basic_block, randomize_params
from tests.helpers import invoke, write_tiny
from tests.test_functional import naive_conv

CASES = list(all_cases())


def _algorithm_cases():
    """(case..., algorithm) for every case and every algorithm at least one of its convolutions can run by."""
    for tag, case_id, factory, shape in CASES:
        p = plan.Plan(nn.Model([factory(np.random.default_rng(0))]), tuple(shape[1:]))
        usable = {a for s in p.steps if isinstance(s, plan.ConvStep)
                  for a in convolution.candidates(s.layer, p.shapes[s.inputs[0]])}
        for algorithm in convolution.ALGORITHMS:
            if algorithm == "lowering" or algorithm in usable:
                yield pytest.param(tag, case_id, factory, shape, algorithm, id=f"{tag}-{case_id}-{algorithm}")
WINOGRAD_FP32_TOL = {2: 1e-5, 4: 1e-4}  # relative to the largest output; measured worst: docs/backprop.md



def convs_of(run, input_shape, dtype):
    return [s for s in run.plan(input_shape, dtype).steps if isinstance(s, plan.ConvStep)]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("pads,hw", [((1, 1, 1, 1), (7, 6)), ((0, 0, 0, 0), (8, 9)), ((2, 2, 2, 2), (5, 5)),
                                      ((2, 0, 1, 2), (6, 7)), ((1, 1, 1, 1), (4, 4))])
def test_winograd_equals_naive_convolution_and_its_gradients(m, pads, hw):
    """Forward against naive loops; weight and input gradients against the lowering's (itself checked
    against naive loops and central differences), float64, tiles that do and do not divide the output."""
    from cnnctl.core import functional as F

    g = np.random.default_rng(0)
    x, w, b = g.standard_normal((3, 2, *hw)), g.standard_normal((4, 2, 3, 3)), g.standard_normal(4)
    y, saved = winograd.forward(x.transpose(1, 2, 3, 0), w, b, pads, m)
    np.testing.assert_allclose(y.transpose(3, 0, 1, 2), naive_conv(x, w, b, (1, 1), pads, (1, 1)), rtol=1e-10,
                               atol=1e-10)
    dy = g.standard_normal(y.shape)
    dx, dw, db = winograd.backward(dy, saved, w, (2, *hw), pads, m)
    _, lsaved = F.conv2d_forward(x, w, b, (1, 1), pads, (1, 1))
    ldx, ldw, ldb = F.conv2d_backward(dy.transpose(3, 0, 1, 2), lsaved, w, x.shape, (1, 1), pads, (1, 1))
    np.testing.assert_allclose(dx.transpose(3, 0, 1, 2), ldx, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dw, ldw, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(db, ldb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_float32_error_is_within_its_stated_tolerance(m):
    """Float32 Winograd against a float64 direct convolution, on a layer of ResNet-20's first stage scaled
    down: the error stays within the tolerance docs/backprop.md gives."""
    g = np.random.default_rng(1)
    x = g.standard_normal((16, 12, 12, 4)).astype(np.float32)
    w = (g.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32)
    y, _ = winograd.forward(x, w, None, (1, 1, 1, 1), m)
    ref = naive_conv(x.transpose(3, 0, 1, 2).astype(np.float64), w.astype(np.float64), np.zeros(16), (1, 1),
                     (1, 1, 1, 1), (1, 1))
    err = np.abs(y.transpose(3, 0, 1, 2) - ref).max() / np.abs(ref).max()
    assert err < WINOGRAD_FP32_TOL[m], err


def _force(run, shape, dtype, algorithm):
    """Every planned convolution of the runner's model by `algorithm` where it can run; returns how many."""
    steps = convs_of(run, shape, dtype)
    run.algorithms = {s.name: algorithm for s in steps}
    return sum(s.algorithm == algorithm for s in convs_of(run, shape, dtype))


@pytest.mark.parametrize(("tag", "case_id", "factory", "shape", "algorithm"), list(_algorithm_cases()))
def test_planned_models_pass_gradient_checks_with_every_algorithm(tag, case_id, factory, shape, algorithm):
    """Every registered layer case as a model run by its plan, each convolution by `algorithm` where it
    applies (the lowering elsewhere), against central differences in float64."""
    g = np.random.default_rng(0)
    layer = factory(g).to(np.float64)
    randomize_params(layer, g)
    model = nn.Model([layer])
    run = Runner(model)
    assert _force(run, tuple(shape[1:]), np.float64, algorithm) or algorithm == "lowering"
    model.set_input_grad(True)
    errors = check_layer(model, g.standard_normal(shape), training=True, runner=run)
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize(("tag", "case_id", "factory", "shape"), CASES, ids=lambda v: str(v))
def test_a_planned_model_equals_its_layers_run_one_by_one(tag, case_id, factory, shape):
    """The default plan (fusions, algorithm rule) gives the outputs and gradients of the layers' own
    forward and backward, float64."""
    if tag in ("dropout", "dropout2d"):
        pytest.skip("random masks: the two runs would draw different numbers")
    g = np.random.default_rng(3)
    layer = factory(g).to(np.float64)
    randomize_params(layer, g)
    x = g.standard_normal(shape)
    layer.set_input_grad(True)
    y = layer.forward(x, True)
    dy = g.standard_normal(y.shape)
    dx = layer.backward(dy)
    own = {p.name: p.grad.copy() for p in layer.parameters()}
    model = nn.Model([layer])
    model.set_input_grad(True)
    run = Runner(model)
    np.testing.assert_allclose(run.forward(x, True), y, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(run.backward(dy), dx, rtol=1e-11, atol=1e-11)
    for p in model.parameters():
        np.testing.assert_allclose(p.grad, own[p.name.removeprefix("layers.0.")], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("algorithm", list(convolution.ALGORITHMS))
def test_every_algorithm_matches_torch_on_a_residual_network(algorithm):
    """A small ResNet (3x3 and 1x1 convolutions, strided and not) run by its plan with every convolution by
    `algorithm` where it applies: output, input and parameter gradients against PyTorch, float32, 1e-4."""
    pytest.importorskip("torch")
    from tests.test_torch_reference import compare

    g = np.random.default_rng(4)
    model = nn.Model([nn.Conv2D(3, 8, 3, padding=1, activation="relu", rng=g), basic_block(g, 8, 8, 1),
                      nn.Conv2D(8, 8, 1, activation="relu", rng=g), basic_block(g, 8, 16, 2), nn.GlobalAvgPool2D(),
                      nn.Dense(16, 5, rng=g)])
    randomize_params(model, g, statistics=True)
    run = Runner(model)
    assert _force(run, (3, 10, 9), np.float32, algorithm) >= 1
    compare(model, g.standard_normal((4, 3, 10, 9)).astype(np.float32), runner=run)


def test_the_default_rule_and_the_plan_description():
    """1x1 stride-1 convolutions are one product, the rest lowered; the ReLU behind max pooling and the
    residual add's ReLU are fused; describe() says so, with memory per step."""
    g = np.random.default_rng(5)
    model = nn.Model([nn.Conv2D(1, 4, 3, padding=1, activation="relu", rng=g), nn.MaxPool2D(2),
                      nn.Conv2D(4, 4, 1, rng=g), basic_block(g, 4, 4, 1), nn.Flatten(), nn.Dense(64, 2, rng=g)])
    rows = {r["layer"]: r for r in plan.Plan(model, (1, 8, 8)).describe(batch=32)}
    assert rows["layers.0"]["algorithm"] == "lowering" and rows["layers.2"]["algorithm"] == "pointwise"
    assert rows["layers.1"]["fused"] == "relu of layers.0" and rows["layers.3"]["fused"] == "relu"
    assert rows["layers.0"]["output_bytes"] == 32 * 4 * 8 * 8 * 4
    # what each planned step keeps for backward, exactly: the lowered input (padded rows x channels x kernel
    # columns x output columns, per image), the pointwise input, the moved and the fused ReLU's byte masks
    assert rows["layers.0"]["saved_bytes"] == (8 + 2) * 1 * 3 * 8 * 32 * 4  # the ReLU moved: no mask here
    assert rows["layers.1"]["saved_bytes"] == 4 * 4 * 4 * 32  # the pooled output's mask (the pool not run yet)
    assert rows["layers.2"]["saved_bytes"] == 4 * 4 * 4 * 32 * 4
    assert rows["layers.3"]["saved_bytes"] == 4 * 4 * 4 * 32


def test_a_hooked_layer_is_not_fused_across_and_sees_its_own_output():
    """A forward hook on a conv whose ReLU the plan would move behind pooling: the plan is rebuilt without
    the move, so the hook sees max(conv, 0)."""
    g = np.random.default_rng(6)
    model = nn.Model([nn.Conv2D(1, 2, 3, padding=1, activation="relu", rng=g), nn.MaxPool2D(2)])
    x = g.standard_normal((2, 1, 6, 6)).astype(np.float32)
    seen = []
    remove = model.layers[0].add_forward_hook(lambda layer, y: seen.append(np.array(y)))
    Runner(model).forward(x)
    remove()
    assert (seen[0] >= 0).all() and (seen[0] == 0).any()
    assert rel_error(seen[0], model.layers[0].forward(x)) == 0


def test_autotuned_plan_is_cached_recorded_and_kept_on_resume(tmp_path, tiny_config, monkeypatch):
    """train --autotune: the timings land in the cache folder, the algorithms in summary.json and in the
    checkpoints' run state; a resume runs with the recorded algorithms even when the cache has changed since
    (here to Winograd), while a new autotuned run takes the cache's."""
    import json

    from cnnctl.run import checkpoint
    from tests.helpers import invoke

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    invoke("train", tiny_config, "--runs-dir", tmp_path / "a", "-q", "--autotune", "--set", "train.epochs=1")
    run = next((tmp_path / "a").iterdir())
    cache = next((tmp_path / "cache" / "cnnctl" / "plans").glob("*.json"))
    timed = json.loads(cache.read_text())
    assert len(timed) == 1 and set(timed.values()) <= set(convolution.ALGORITHMS)
    recorded = json.loads((run / "summary.json").read_text())["plan"]
    assert recorded == {"layers.0": next(iter(timed.values()))}
    assert checkpoint.load(run / "checkpoints" / "last.safetensors").run.algorithms == recorded
    cache.write_text(json.dumps({k: "winograd2" for k in timed}))  # a later cache must not change the run
    invoke("train", "--resume", run, "-q", "--set", "train.epochs=2")
    assert json.loads((run / "summary.json").read_text())["plan"] == recorded
    invoke("train", tiny_config, "--runs-dir", tmp_path / "b", "-q", "--set", "train.autotune=true",
           "--set", "train.epochs=2")
    straight = next((tmp_path / "b").iterdir())
    assert json.loads((straight / "summary.json").read_text())["plan"] == {"layers.0": "winograd2"}
    shown = json.loads(invoke("inspect", straight / "checkpoints" / "last.safetensors", "--plan", "--json").output)
    assert shown["plan"]["recorded"] and shown["plan"]["algorithms"] == {"layers.0": "winograd2"}
    assert shown["plan"]["steps"][0]["algorithm"] == "winograd2"


def test_bench_prints_the_plan(tiny_config):
    """bench --plan: a row per step with its algorithm and fusions; --json carries the same rows."""
    import json

    from tests.helpers import invoke

    text = invoke("bench", tiny_config, "--steps", "1", "--warmup", "0", "--plan").output
    assert "execution plan" in text and "outside the planned steps" in text
    res = json.loads(invoke("bench", tiny_config, "--steps", "1", "--warmup", "0", "--plan", "--json").output)
    assert [r["kind"] for r in res["plan_steps"]] == ["conv", "maxpool2d", "flatten", "dropout", "dense"]
    assert res["algorithms"] == {"layers.0": "lowering"}
    # every step was timed, in both passes, and the step's time outside them is what is left of the median step
    assert [r["layer"] for r in res["plan_steps"]] == [r["layer"] for r in res["plan"]]
    assert all(r["forward_ms"] > 0 for r in res["plan_steps"]) and res["plan_steps"][0]["backward_ms"] > 0
    assert res["ms_outside_steps"] == pytest.approx(max(0.0, res["ms_per_step"] - sum(
        r["forward_ms"] + r["backward_ms"] for r in res["plan_steps"])), abs=1e-6)
    assert res["plan_steps"][1]["fused"] == "relu of layers.0"


def test_inspect_prints_the_plan_without_timing_it(tiny_config):
    """inspect --plan: the same steps as bench --plan (no times), algorithms by the default rule for a config."""
    import json

    from tests.helpers import invoke

    text = invoke("inspect", tiny_config, "--plan").output
    assert "execution plan (batch" in text and "default rule" in text and "fwd ms" not in text
    res = json.loads(invoke("inspect", tiny_config, "--plan", "--json").output)["plan"]
    assert [r["kind"] for r in res["steps"]] == ["conv", "maxpool2d", "flatten", "dropout", "dense"]
    assert res["algorithms"] == {"layers.0": "lowering"} and not res["recorded"]
    assert res["steps"][1]["fused"] == "relu of layers.0" and res["steps"][0]["saved_bytes"] > 0


class _SiLU(nn.Layer):
    """x * sigmoid(x), written here and nowhere else: a new element-wise layer type needs no change to the
    plan or to any other layer."""

    def forward(self, x, training=True):
        self._x, self._s = x, 1 / (1 + np.exp(-x))
        return x * self._s

    def backward(self, dy):
        s = self._s
        return dy * (s + self._x * s * (1 - s))


def test_a_new_element_wise_layer_type_runs_through_the_plan_untouched(monkeypatch):
    """A SiLU defined in this test alone, as a layer of its own, as a convolution's activation and as a
    residual unit's: the planned model equals its layers run one by one and passes central differences
    (float64), and the plan still fuses what it knows around it."""
    from cnnctl.core.nn import base

    monkeypatch.setitem(base.ACTIVATIONS, "silu", _SiLU)
    g = np.random.default_rng(7)
    body = nn.Sequential([nn.Conv2D(4, 4, 3, padding=1, bias=False, rng=g), nn.BatchNorm2D(4, activation="silu"),
                          nn.Conv2D(4, 4, 3, padding=1, rng=g)])
    layers = [nn.Conv2D(2, 4, 3, padding=1, activation="silu", rng=g), nn.Residual(body, None, "silu"), _SiLU(),
              nn.Conv2D(4, 4, 3, padding=1, activation="relu", rng=g), nn.MaxPool2D(2), nn.Flatten(),
              nn.Dense(16, 3, rng=g)]
    model = nn.Model(layers).to(np.float64)
    randomize_params(model, g)
    x = g.standard_normal((3, 2, 4, 4))
    run = Runner(model)
    kinds = [(s.kind, s.fused) for s in run.plan((2, 4, 4), np.float64).steps]
    assert ("maxpool2d", ["relu of layers.3"]) in kinds and ("join", []) in kinds  # not element-wise: not fused

    model.set_input_grad(True)
    y = x
    for layer in layers:  # the layers' own forward and backward, one by one
        y = layer.forward(y, True)
    dy = g.standard_normal(y.shape)
    d = dy
    for layer in reversed(layers):
        d = layer.backward(d)
    own = {p.name: p.grad.copy() for p in model.parameters()}
    np.testing.assert_allclose(run.forward(x, True), y, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(run.backward(dy), d, rtol=1e-11, atol=1e-11)
    for p in model.parameters():
        np.testing.assert_allclose(p.grad, own[p.name], rtol=1e-11, atol=1e-11)
    errors = check_layer(model, x, training=True, runner=run)
    assert max(errors.values()) < 1e-6, errors


def _make_cache(path, kind):
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "deeply nested":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "a folder":
        path.mkdir()
    elif kind == "too large":
        with path.open("wb") as f:
            f.truncate(plan.MAX_CACHE_BYTES + 1)
    elif kind == "not an object":
        path.write_text("[1, 2]")


@pytest.mark.parametrize("kind", ["deeply nested", "link to /dev/zero", "fifo", "a folder", "too large",
                                  "not an object"])
def test_a_bad_autotune_cache_costs_a_warning_and_training_goes_on(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = plan.cache_path()
    _make_cache(path, kind)
    with pytest.warns(CnnctlWarning, match="autotune cache"):
        invoke("train", write_tiny(tmp_path), "--runs-dir", tmp_path / "runs", "--autotune")
    assert stat.S_ISCHR(os.stat("/dev/zero").st_mode)  # a link in the cache is replaced, never written through
    if kind != "a folder":
        assert path.is_file() and not path.is_symlink() and isinstance(json.loads(path.read_text()), dict)


def test_an_unwritable_cache_costs_one_warning_line_and_training_goes_on(tmp_path):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "cnnctl", "train", write_tiny(tmp_path), "--runs-dir", tmp_path / "r",
                          "--autotune", "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert [line.startswith("warning: autotune cache") for line in lines] == [True, True], lines  # read, write
    assert "Traceback" not in res.stderr and "best val_acc" in res.stdout
