"""export --int8 (interop/quantize.py): onnxruntime's static quantization of the exported model, calibrated on the
run's own training images, kept only when its accuracy on the test split is within --max-drop of the float
model's; a model whose int8 version loses more is refused and nothing is written."""

import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tests.helpers import invoke  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quick start trained 3 epochs (about 89% on its 2,000 test images)."""
    tmp = tmp_path_factory.mktemp("int8")
    invoke("train", "configs/quickstart.yaml", "--set", "train.epochs=3", "--runs-dir", tmp / "runs", "--quiet")
    return next((tmp / "runs").iterdir())


def test_the_int8_model_passes_its_gate_and_carries_the_metadata(trained, tmp_path):
    res = invoke("export", trained, "--out", tmp_path / "m.onnx", "--int8", "--calibrate", "128")
    found = re.search(r"accuracy ([\d.]+)% float, ([\d.]+)% int8", res.output)
    assert found and float(found[1]) - float(found[2]) <= 1.0 and float(found[1]) > 50, res.output
    model = onnx.load(str(tmp_path / "m-int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert weights  # the convolutions' weights stored as int8
    meta = {p.key: p.value for p in model.metadata_props}
    assert "classes" in meta and "normalization" in meta and meta["quantization"].startswith("int8")
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    f = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x})[0]
    q = ort.InferenceSession(str(tmp_path / "m-int8.onnx")).run(None, {"input": x})[0]
    assert q.shape == f.shape and np.abs(q - f).max() < 0.25 * np.abs(f).max()  # the same model, in int8


def test_an_int8_model_that_loses_too_much_is_refused_and_not_written(trained, tmp_path):
    """Calibrated on one black image, every activation range is 0: the int8 model guesses, and the gate says so."""
    from cnnctl import api
    from cnnctl.interop.quantize import quantize
    from cnnctl.run.start import run_data

    invoke("export", trained, "--out", tmp_path / "m.onnx")
    predictor = api.load(trained)
    ds = run_data(predictor.spec, predictor._rows, predictor.normalization)
    x01, y = ds.test.x.astype(np.float32) / 255, ds.test.y
    with pytest.raises(Exception, match=r"loses [\d.]+ points of accuracy .* more than --max-drop 1") as e:
        quantize(tmp_path / "m.onnx", tmp_path / "bad-int8.onnx", np.zeros((1, 1, 28, 28), np.float32), x01, y)
    assert "--calibrate" in e.value.hint and not (tmp_path / "bad-int8.onnx").exists()


def test_int8_options_are_checked(trained, tmp_path):
    out = invoke("export", trained, "--out", tmp_path / "m.onnx", "--int8", "--calibrate", "0", code=2).output
    assert "--calibrate 0" in out and "1 or more" in out and not (tmp_path / "m.onnx").exists()  # before any work
    out = invoke("export", trained, "--out", tmp_path / "m.onnx", "--int8", "--max-drop", "-1", code=2).output
    assert "--max-drop -1" in out and "0 points or more" in out


@pytest.mark.slow
def test_lenet5_on_mnist_passes_the_int8_gate(lenet5_mnist_run, tmp_path):
    res = invoke("export", lenet5_mnist_run, "--out", tmp_path / "lenet5.onnx", "--int8")
    found = re.search(r"test split \(10,000 images, onnxruntime\): accuracy ([\d.]+)% float, ([\d.]+)% int8",
                      res.output)
    assert found and float(found[1]) > 98 and float(found[1]) - float(found[2]) <= 1.0, res.output


@pytest.mark.slow
def test_resnet_fashion_passes_the_int8_gate(resnet_fashion_run, tmp_path):
    """resnet-fashion-fast's network (batchnorm, residual units; conftest's shortened run) on the whole test split."""
    res = invoke("export", resnet_fashion_run, "--out", tmp_path / "resnet.onnx", "--int8")
    found = re.search(r"test split \(10,000 images, onnxruntime\): accuracy ([\d.]+)% float, ([\d.]+)% int8",
                      res.output)
    assert found and float(found[1]) > 92 and float(found[1]) - float(found[2]) <= 1.0, res.output
    assert "out-of-range" not in res.output  # the quantizer's notes on its own fallbacks are not the user's
