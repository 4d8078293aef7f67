"""Imbalanced classes: loss.class_weights (auto or given), data.stratify, data.sampler: balanced."""

import numpy as np
import yaml

from cnnctl.cli import app
from cnnctl.config.build import build_loss
from cnnctl.config.reading import validate
from cnnctl.data import epoch_order, load_dataset
from tests.conftest import TINY
from tests.helpers import runner


def imbalanced(tmp_path, counts=(300, 60, 20)):
    """An npz with 380 training images: classes 0, 1, 2 in the ratio 15:3:1."""
    g = np.random.default_rng(0)
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    x = (g.random((len(y), 8, 8)) * 255).astype(np.uint8)
    path = tmp_path / "imb.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:30], y_test=y[:30])
    data = yaml.safe_load(TINY)
    data["data"] = {"dataset": "npz", "root": str(path), "batch_size": 32, "val_split": 0.25}
    data["model"]["input_shape"] = [1, 8, 8]
    data["model"]["layers"][-1]["units"] = 3
    return data


def test_stratify_keeps_each_class_share_in_validation(tmp_path):
    data = imbalanced(tmp_path)
    data["data"]["stratify"] = True
    spec = validate(data)
    ds = load_dataset(spec.data, spec.model.input_shape, np.random.default_rng(1))
    assert np.bincount(ds.val.y).tolist() == [75, 15, 5]
    assert np.bincount(ds.train.y).tolist() == [225, 45, 15]
    again = load_dataset(spec.data, spec.model.input_shape, np.random.default_rng(1))
    assert np.array_equal(again.val.x, ds.val.x)  # still decided by the seed alone


def test_auto_class_weights_are_inverse_frequencies(tmp_path):
    data = imbalanced(tmp_path)
    data["loss"] = {"type": "cross_entropy", "class_weights": "auto"}
    spec = validate(data)
    y = np.array([0] * 15 + [1] * 3 + [2])
    weights = build_loss(spec, y, 3).class_weights
    np.testing.assert_allclose(weights, [19 / 45, 19 / 9, 19 / 3])
    assert np.isclose((weights[y]).mean(), 1.0)  # the average image weighs 1


def test_the_balanced_sampler_draws_classes_evenly(tmp_path):
    spec = validate(imbalanced(tmp_path))
    ds = load_dataset(spec.data, spec.model.input_shape, np.random.default_rng(1))
    order = epoch_order(ds.train, "balanced", np.random.default_rng(2))
    assert len(order) == len(ds.train)
    share = np.bincount(ds.train.y[order], minlength=3) / len(order)
    assert np.all(np.abs(share - 1 / 3) < 0.06), share


def test_imbalance_options_train_and_wrong_weights_are_clear_errors(tmp_path):
    data = imbalanced(tmp_path)
    data["data"].update(stratify=True, sampler="balanced")
    data["loss"] = {"type": "cross_entropy", "class_weights": "auto"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["train", str(tmp_path / "c.yaml"), "--runs-dir", str(tmp_path / "runs"), "-q"])
    assert res.exit_code == 0, res.output
    data["loss"]["class_weights"] = [1.0, 2.0]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["train", str(tmp_path / "c.yaml"), "--runs-dir", str(tmp_path / "runs"), "-q"])
    assert res.exit_code == 2 and "2 values but the dataset has 3 classes" in res.output, res.output
    data["loss"] = {"type": "mse", "class_weights": "auto"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["inspect", str(tmp_path / "c.yaml")])
    assert res.exit_code == 2 and "cross_entropy only" in res.output
