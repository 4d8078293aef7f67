"""CONTRIBUTING's paths, each walked with a toy: a dataset format registered by one decorator is trained on; a verb
module registered by one import is run; an ONNX operator's converter registered by one decorator is imported."""

import numpy as np
import pytest

import cnnctl
from cnnctl.data import formats
from tests.conftest import ROOT
from tests.helpers import invoke


@pytest.fixture
def stripes_format():
    """A toy dataset format: horizontal or vertical stripes, drawn from the run's data generator."""

    @formats.register_format("stripes", "horizontal or vertical stripes (a test's toy)", located_by="nothing",
                             classes=lambda spec: ["horizontal", "vertical"])
    def load(spec, input_shape, rng, progress):
        c, h, w = input_shape

        def draw(n):
            y = rng.integers(0, 2, n)
            rows = (np.arange(h)[:, None] % 2 == 0) & np.ones((h, w), bool)
            cols = (np.arange(w)[None, :] % 2 == 0) & np.ones((h, w), bool)
            x = np.where(y[:, None, None, None] == 0, rows, cols) * np.uint8(200)
            noise = rng.integers(0, 40, (n, c, h, w))
            return (np.broadcast_to(x, (n, c, h, w)) + noise).astype(np.uint8), y.astype(np.int64)

        return formats.Raw(["horizontal", "vertical"], draw(96), draw(32))

    try:
        yield load
    finally:
        formats.FORMATS.pop("stripes")


def _config(dataset: str) -> dict:
    return {"name": "toy", "seed": 0,
            "data": {"dataset": dataset, "batch_size": 16, "val_split": 0.25},
            "model": {"input_shape": [1, 8, 8], "layers": [
                {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1, "activation": "relu"},
                {"type": "global_avgpool2d"}, {"type": "dense", "units": 2}]},
            "optimizer": {"type": "adam", "lr": 0.03}, "train": {"epochs": 12}}


def test_a_dataset_format_is_one_registered_loader(stripes_format, tmp_path):
    run = cnnctl.train(_config("stripes"), runs_dir=tmp_path / "runs")
    assert run.summary["dataset"]["classes"] == ["horizontal", "vertical"]
    assert run.summary["dataset"]["train"] == 72 and run.summary["dataset"]["test"] == 32
    assert run.summary["best"]["val_acc"] > 0.9  # stripes are easy: it learned from the toy's images
    assert cnnctl.evaluate(run.dir)["n"] == 32
    # data.resize is refused for it (it decodes no pictures), from the registry
    with pytest.raises(cnnctl.errors.CnnctlError, match="data.resize applies to picture files"):
        cnnctl.train(_config("stripes"), overrides=["data.resize=8"], runs_dir=tmp_path / "runs")


def test_an_unregistered_dataset_is_refused_with_the_registered_names():
    out = invoke("inspect", "configs/quickstart.yaml", "--set", "data.dataset=stripes", code=2).output
    names = out.split("the registered datasets are", 1)[1].split("(got")[0]
    assert [n.strip() for n in names.split(",")] == list(formats.FORMATS)


# ---------------------------------------------------------------- the registries are the only source of names

def _readme_row(kind: str) -> set[str]:
    import re

    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith(f"| {kind} |"))
    return set(re.findall(r"`([a-z0-9_]+)`", line))


def test_the_readme_tables_list_exactly_what_the_registries_hold():
    from cnnctl.core import nn, optim, schedules

    assert _readme_row("layers") - {"repeat"} == set(nn.SPECS)
    assert _readme_row("optimizers") == set(optim.OPTIMIZERS)
    assert _readme_row("schedules") - {"warmup_epochs"} == set(schedules.SCHEDULES)
    assert _readme_row("losses") - {"log_softmax"} == set(nn.LOSSES)  # log_softmax: the layer nll follows
    assert _readme_row("datasets") == set(formats.FORMATS)


def _verbs() -> set[str]:
    from cnnctl.cli import app

    return {c.name or c.callback.__name__ for c in app.registered_commands}


def test_the_readme_and_docs_verbs_list_exactly_the_cli_verbs():
    import re

    readme = set(re.findall(r"^\| `cnnctl ([a-z-]+)", (ROOT / "README.md").read_text(), re.M))
    documented = set(re.findall(r"(?:\*\*|^\| )`cnnctl ([a-z-]+)", (ROOT / "docs" / "verbs.md").read_text(), re.M))
    assert readme == _verbs() and documented == _verbs()
    listed = invoke("--help").output
    assert all(re.search(rf"^\s+{verb}\s", listed, re.M) for verb in _verbs())


def test_a_verb_is_one_module_registered_by_its_import(tmp_path, monkeypatch):
    """A module that declares a verb on the app (as cli/runs.py does) is a verb once imported: in --help, run with
    its arguments, its errors printed by the one error printer with exit code 2."""
    from cnnctl.cli.common import app

    (tmp_path / "hello_verb.py").write_text(
        "from pathlib import Path\n"
        "from typing import Annotated\n\n"
        "import typer\n\n"
        "from cnnctl.cli.common import app, guarded, out\n"
        "from cnnctl.errors import CnnctlError\n\n\n"
        "@app.command('hello')\n"
        "@guarded\n"
        "def hello(name: Annotated[str, typer.Argument(metavar='NAME')]):\n"
        "    \"\"\"Greet NAME (a toy verb).\"\"\"\n"
        "    if not name.isidentifier():\n"
        "        raise CnnctlError(f'{name!r} is not a name', 'give letters')\n"
        "    out.print(f'hello {name}')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = list(app.registered_commands)
    try:
        __import__("hello_verb")
        assert "hello" in _verbs() and "Greet NAME" in invoke("--help").output
        assert invoke("hello", "world").output.strip() == "hello world"
        bad = invoke("hello", "9 lives", code=2).output
        assert "'9 lives' is not a name" in bad and "give letters" in bad and "Traceback" not in bad
    finally:
        app.registered_commands[:] = before
        __import__("sys").modules.pop("hello_verb", None)


def test_an_onnx_operator_is_one_registered_converter(tmp_path):
    """ThresholdedRelu (ONNX's x > alpha ? x : 0), which cnnctl does not import: a converter registered with
    @converts (as convert.py's are) makes it import, folded into the convolution, equal to onnxruntime."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import helper

    from cnnctl.interop import onnx_import
    from cnnctl.interop.onnx_import.operators import CONVERTERS, converter_for, converts
    from tests.test_onnx_import_hostile import conv_net, write

    nodes, inits = conv_net()
    nodes[1] = helper.make_node("ThresholdedRelu", ["c"], ["r"], alpha=0.0, name="thresholded")
    path = write(tmp_path / "m.onnx", nodes, inits)
    out = invoke("import", path, "--out", tmp_path / "refused", code=2).output
    assert "operators cnnctl cannot import: ThresholdedRelu" in " ".join(out.split())

    @converts("ThresholdedRelu")
    def thresholded_relu(imp, node, a, layers):
        alpha = a.get("alpha", 1.0)
        if not isinstance(alpha, float) or alpha != 0.0:
            imp.fail(f"{imp.where()}: alpha {alpha}; only alpha 0 (a ReLU) is imported")
        imp.activation(layers, "relu")

    try:
        assert converter_for("ThresholdedRelu", 17) is thresholded_relu
        _, _, model, _, _, _, imp = onnx_import.build(path, "m", None, None, None)
    finally:
        CONVERTERS.pop("ThresholdedRelu")
    assert [s["type"] for s in imp.layers] == ["conv2d", "global_avgpool2d", "dense"]
    assert imp.layers[0]["activation"] == "relu"
    x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    np.testing.assert_allclose(model.forward(x, training=False), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_each_layers_onnx_operator_is_written_once_for_export_and_import():
    """A layer type's ONNX operator stands in its class (`onnx_op`, gathered in nn.ONNX_OPS): its export writes
    self.onnx_op, and the importer's converters, joins and rewrite passes read the table, never the name."""
    import inspect

    from cnnctl.core import nn

    importer = ROOT / "src" / "cnnctl" / "interop" / "onnx_import"
    texts = {p.name: p.read_text() for p in importer.glob("*.py") if p.name != "graph.py"}  # graph.py: folding
    for tag, op in nn.ONNX_OPS.items():
        cls = nn.REGISTRY[tag]
        assert f'"{op}"' not in inspect.getsource(cls.onnx), f"{cls.__name__}.onnx writes {op!r} by name"
        for name, text in texts.items():
            assert f'"{op}"' not in text, f"onnx_import/{name} writes {op!r}, {tag}'s operator, by name"
    assert nn.ONNX_OPS["lrn"] == "LRN" and nn.ONNX_OPS["conv2d"] == "Conv"


def test_the_readme_set_up_installs_what_the_everyday_verbs_need():
    """The README's set-up command installs the `standard` extra, and it holds every package of the extras that
    predict, explain, report, plot, export and import name in their messages (images, plot, onnx, int8)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert 'pip install -e ".[standard]" && cnnctl train configs/quickstart.yaml' in (ROOT / "README.md").read_text()
    for name in ("images", "plot", "onnx", "int8"):
        assert set(extras[name]) <= set(extras["standard"]), name
