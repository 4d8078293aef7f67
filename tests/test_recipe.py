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
