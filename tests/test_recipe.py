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


def trained(cfg, runs_dir, *sets, epochs=2):
    """The metric rows of a run of cfg for `epochs` epochs with these --set overrides."""
    from tests.helpers import metric_rows

    invoke("train", cfg, "--runs-dir", runs_dir, "--set", f"train.epochs={epochs}", *(a for v in sets
                                                                                      for a in ("--set", v)))
    return metric_rows(next(runs_dir.iterdir()))


def resumed(cfg, runs_dir, epochs=2):
    """The metric rows of a run of cfg stopped after epochs - 1 epochs and resumed to `epochs`."""
    from tests.helpers import metric_rows

    invoke("train", cfg, "--runs-dir", runs_dir, "--set", f"train.epochs={epochs - 1}")
    run = next(runs_dir.iterdir())
    invoke("train", "--resume", run, "--set", f"train.epochs={epochs}")
    return metric_rows(run)


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
    from cnnctl.data import augment
    from cnnctl.data.spec import AugmentSpec

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
    cfg = config(tmp_path, lambda s: s["data"].update(augment={"horizontal_flip": "alternating"}))
    straight = trained(cfg, tmp_path / "a", epochs=3)
    assert resumed(cfg, tmp_path / "b", epochs=3) == straight
    assert trained(cfg, tmp_path / "c", "data.augment.horizontal_flip=true", epochs=3) != straight


@pytest.mark.parametrize("out,inp,groups,kernel", [(4, 4, 1, (3, 3)), (6, 4, 1, (3, 3)), (3, 5, 1, (1, 1)),
                                                   (8, 8, 8, (3, 3)), (8, 4, 2, (3, 5)), (5, 7, 1, ())])
def test_dirac_init_is_torch_dirac_where_the_channels_allow_it(out, inp, groups, kernel):
    torch = pytest.importorskip("torch")
    from cnnctl.core import nn

    g = np.random.default_rng(0)
    layer = nn.Conv2D(inp, out, kernel, groups=groups, init="dirac", rng=g) if kernel else \
        nn.Dense(inp, out, init="dirac", rng=g)
    w = layer.params["weight"]
    t = torch.empty(w.shape)
    torch.nn.init.dirac_(t, groups) if kernel else torch.nn.init.eye_(t)
    t = t.numpy()
    identity = np.array([(o % (out // groups)) < w.shape[1] for o in range(out)])
    np.testing.assert_array_equal(w[identity], t[identity])
    if (~identity).any():  # the rest keep He normal draws
        assert np.abs(w[~identity]).mean() > 0.05
    if kernel and groups == 1 and out == inp:  # the layer starts as the identity
        x = g.standard_normal((2, inp, 6, 6)).astype(np.float32)
        np.testing.assert_allclose(nn.Conv2D(inp, out, kernel, padding=1, init="dirac", bias=False, rng=g).forward(
            x), x, atol=1e-6)


def test_ghost_batchnorm_from_a_config_trains_and_resumes_exactly(tmp_path):
    def change(s):
        s["model"]["layers"].insert(1, {"type": "batchnorm", "ghost_batch": 8, "activation": "relu"})
    cfg = config(tmp_path, change)
    straight = trained(cfg, tmp_path / "a")
    assert resumed(cfg, tmp_path / "b") == straight
    one_virtual_batch = trained(cfg, tmp_path / "c", "model.layers.1.ghost_batch=32")  # the batch: plain batchnorm
    assert one_virtual_batch == trained(cfg, tmp_path / "d", "model.layers.1.ghost_batch=null") != straight


def test_frozen_batchnorm_scales_are_a_parameter_group(tmp_path):
    """Page's frozen batchnorm scales: the weights of every batchnorm in a group with lr_scale 0 and no decay
    stay at their initial value, whatever the optimizer's state does."""
    from cnnctl.run import checkpoint

    def change(s):
        s["model"]["layers"].insert(1, {"type": "batchnorm", "weight_init": 1.0})
        s["optimizer"] = {"type": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "groups": [
            {"match": {"layer_type": "batchnorm", "param": "weight"}, "lr_scale": 0.0, "weight_decay": 0.0}]}
    invoke("train", config(tmp_path, change), "--runs-dir", tmp_path / "runs")
    state = checkpoint.load(next((tmp_path / "runs").iterdir()) / "checkpoints" / "last.safetensors").model_state
    np.testing.assert_array_equal(state["layers.1.weight"], np.ones(4, np.float32))
    assert np.abs(state["layers.1.bias"]).max() > 0  # the rest trains


def test_whitening_filters_decorrelate_the_patches():
    from cnnctl.run import whitening

    g = np.random.default_rng(0)
    mix = g.standard_normal((6, 6))
    rows = g.standard_normal((20000, 6)) @ mix  # correlated patch values
    filters, values = whitening.whitening_filters(rows, eps=0.0)
    out = (rows - rows.mean(axis=0)) @ filters.T
    np.testing.assert_allclose(np.cov(out.T, bias=True), np.eye(6), atol=1e-8)
    assert (np.diff(values) <= 0).all()  # largest eigenvalue first


def test_patch_whitening_initialises_the_first_convolution_from_the_data(tmp_path):
    from cnnctl.config.reading import load_config
    from cnnctl.run import whitening
    from cnnctl.run.trainer import Trainer

    def change(s):
        s["model"]["layers"][0].update(filters=12, kernel_size=2, init="patch_whitening")  # d = 4: 4 + 4 + 4 random
    cfg = config(tmp_path, change)
    trainer = Trainer(load_config(cfg)[0])
    w = trainer.model.layers[0].params["weight"]
    rows = whitening.patches(trainer.ds, (2, 2))
    out = (rows - rows.mean(axis=0)) @ w[:4].reshape(4, -1).T.astype(np.float64)
    np.testing.assert_allclose(np.cov(out.T, bias=True), np.eye(4), atol=0.02)  # eps keeps it just under 1
    np.testing.assert_array_equal(w[4:8], -w[:4])
    assert trainer.whitening["whitened_filters"] == 8 and len(trainer.whitening["eigenvalues"]) == 4
    straight = trained(cfg, tmp_path / "a")
    summary = json.loads(next((tmp_path / "a").iterdir()).joinpath("summary.json").read_text())
    assert summary["patch_whitening"]["patch_values"] == 4
    assert resumed(cfg, tmp_path / "b") == straight


def test_patch_whitening_is_for_the_first_layer_only(tmp_path):
    from tests.test_errors import expect_error

    cfg = config(tmp_path, lambda s: s["model"]["layers"].insert(2, {"type": "conv2d", "filters": 4,
                                                                      "kernel_size": 1, "init": "patch_whitening"}))
    expect_error(["inspect", cfg], "model.layers[2] (conv2d)", "patch_whitening is for the model's first layer")
