"""CONTRIBUTING's paths, each walked with a toy: a dataset format registered by one decorator is trained on; a verb
module registered by one import is run; an ONNX operator's converter registered by one decorator is imported."""

import numpy as np
import pytest

import cnnctl
from cnnctl.data import formats
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
