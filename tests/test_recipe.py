"""Accuracy per unit of compute (issue 23): the compute budget, and the recipe pieces as config keys."""

import json

import numpy as np
import pytest
import yaml

from tests.conftest import TINY
from tests.helpers import invoke


def config(tmp_path, change=lambda s: None, name="c.yaml"):
    spec = yaml.safe_load(TINY)
    change(spec)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_training_compute_is_reported_by_inspect_summary_and_the_last_line(tmp_path):
    cfg = config(tmp_path)
    report = json.loads(invoke("inspect", cfg, "--json").stdout)
    macs, train = report["total_macs"], report["dataset"]["train"]
    assert report["training_pflops_per_epoch"] == pytest.approx(6 * macs * train / 1e15)
    assert "PFLOPs per epoch of 240 images" in invoke("inspect", cfg).stdout
    res = invoke("train", cfg, "--runs-dir", tmp_path / "runs", "--set", "data.batch_size=50")
    summary = json.loads(next((tmp_path / "runs").iterdir()).joinpath("summary.json").read_text())
    assert summary["training_pflops"] == pytest.approx(6 * macs * 2 * 240 / 1e15)  # two epochs, short batches too
    assert f"training compute {summary['training_pflops']:.4g} PFLOPs" in res.stdout


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    from cnnctl.config import AugmentSpec
    from cnnctl.data import augment

    odd, even = (augment.alternating_flips(1000, 7, e) for e in (1, 2))
    assert np.array_equal(odd, ~even) and 0.45 < odd.mean() < 0.55
    assert np.array_equal(odd, augment.alternating_flips(1000, 7, 3))
    assert not np.array_equal(odd, augment.alternating_flips(1000, 8, 1))  # the seed decides which half
    x = np.arange(2 * 1 * 2 * 3, dtype=np.uint8).reshape(2, 1, 2, 3)
    out = augment.apply(x, AugmentSpec(horizontal_flip="alternating"), np.random.default_rng(0),
                        np.array([True, False]))
    np.testing.assert_array_equal(out[0], x[0, :, :, ::-1])
    np.testing.assert_array_equal(out[1], x[1])


def test_alternating_flip_trains_and_resumes_exactly(tmp_path):
    from tests.helpers import metric_rows

    cfg = config(tmp_path, lambda s: s["data"].update(augment={"horizontal_flip": "alternating"}))
    invoke("train", cfg, "--runs-dir", tmp_path / "a", "--set", "train.epochs=3")
    invoke("train", cfg, "--runs-dir", tmp_path / "b", "--set", "train.epochs=2")
    run = next((tmp_path / "b").iterdir())
    invoke("train", "--resume", run, "--set", "train.epochs=3")
    assert metric_rows(run) == metric_rows(next((tmp_path / "a").iterdir()))
    invoke("train", cfg, "--runs-dir", tmp_path / "c", "--set", "train.epochs=3", "--set",
           "data.augment.horizontal_flip=true")
    assert metric_rows(next((tmp_path / "c").iterdir())) != metric_rows(run)
