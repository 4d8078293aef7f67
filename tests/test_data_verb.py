"""`cnnctl data`: class counts of every split and a grid of samples, for every dataset type."""

import json

import numpy as np
import pytest

from cnnctl import data
from tests.conftest import TINY
from tests.helpers import invoke
from tests.test_data import write_cifar
from tests.test_datasets import make_folder


def _npz(tmp_path, dtype):
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (40, 16, 16)).astype(dtype)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=np.arange(40) % 3, x_test=x[:9], y_test=np.arange(9) % 3)
    return f"dataset: npz\n  root: {path}\n  classes: [a, b, c]", (1, 16, 16), 3


def _folder(tmp_path):
    pytest.importorskip("PIL")
    make_folder(tmp_path / "imgs")
    return f"dataset: folder\n  root: {tmp_path / 'imgs'}", (3, 16, 16), 2


def _cifar(tmp_path):
    write_cifar(tmp_path / "cifar")
    return f"dataset: cifar10\n  root: {tmp_path / 'cifar'}", (3, 32, 32), 10


def _digits(tmp_path):
    pytest.importorskip("sklearn")
    return "dataset: digits", (1, 8, 8), 10


def _mnist(tmp_path):
    from tests.conftest import MNIST

    if not (MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("MNIST not found")
    return f"dataset: mnist\n  root: {MNIST}", (1, 28, 28), 10


DATASETS = {
    "shapes": lambda p: ("dataset: shapes", (1, 16, 16), 4),
    "npz-uint8": lambda p: _npz(p, np.uint8),
    "npz-float": lambda p: _npz(p, np.float64),
    "folder": _folder,
    "cifar10": _cifar,
    "digits": _digits,
    "mnist": _mnist,
}


def config_for(tmp_path, dataset_lines, shape, classes):
    text = TINY.replace("dataset: shapes", dataset_lines).replace("input_shape: [1, 16, 16]",
                                                                  f"input_shape: {list(shape)}")
    text = text.replace("units: 4", f"units: {classes}")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("kind", DATASETS)
def test_counts_and_grid_for_every_dataset_type(tmp_path, kind):
    pytest.importorskip("matplotlib")
    cfg = config_for(tmp_path, *DATASETS[kind](tmp_path))
    res = json.loads(invoke("data", cfg, "--json", "--out", tmp_path / "g.png", "--augmented").stdout)
    splits = res["splits"]
    assert set(splits) == {"train", "val", "test"}
    for s in splits.values():
        assert sum(s["per_class"]) == s["total"] and len(s["per_class"]) == len(res["classes"])
    assert splits["train"]["total"] > 0 and splits["test"]["total"] > 0
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = invoke("data", cfg, "--split", "test").stdout
    assert "total" in text and f"{splits['test']['total']:,}" in text and res["classes"][-1] in text


def test_the_counts_are_the_runs_own_split(tmp_path, tiny_config):
    """The validation split shown is the one training carves from the seed; a checkpoint shows its run's."""
    res = json.loads(invoke("data", tiny_config, "--json").stdout)
    assert res["splits"]["train"]["total"] == 240 and res["splits"]["val"]["total"] == 60
    invoke("train", tiny_config, "--runs-dir", tmp_path / "runs", "--name", "r")
    run = next((tmp_path / "runs").iterdir())
    from_run = json.loads(invoke("data", run, "--json").stdout)
    assert from_run["splits"] == res["splits"] and from_run["mean"] == res["mean"]


def test_samples_are_drawn_from_the_seed_and_augmented_as_in_training():
    from cnnctl.data.spec import AugmentSpec, DataSpec

    ds = data.load_dataset(DataSpec(dataset="shapes", shapes={"train_size": 50, "test_size": 10}), (1, 12, 12),
                           np.random.default_rng(0))
    a, ya = data.samples(ds, ds.train, 8, np.random.default_rng(1))
    b, yb = data.samples(ds, ds.train, 8, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(ya)) >= 2
    flipped, _ = data.samples(ds, ds.train, 8, np.random.default_rng(1), AugmentSpec(random_crop=3))
    assert flipped.shape == a.shape and not np.array_equal(flipped, a)
    assert len(data.samples(ds, ds.test, 100, np.random.default_rng(0))[1]) == 10


@pytest.mark.parametrize("args,words", [
    (["--split", "val", "--augmented"], "--augmented applies to the train split"),
    (["--split", "holdout"], "--split must be train, val or test"),
    (["--out", "/proc/nope/g.png"], "cannot write there"),
])
def test_wrong_options_are_refused_before_any_work(tiny_config, args, words):
    res = invoke("data", tiny_config, *args, code=2)
    assert words in res.output and "Traceback" not in res.output
