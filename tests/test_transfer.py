"""Fine-tuning on one's own pictures: data.resize (torchvision's evaluation transform), the random resized crop
(its training transform), and frozen layers."""

import numpy as np
import pytest
import yaml

from cnnctl.data import augment, files
from tests.conftest import TINY
from tests.helpers import invoke
from tests.test_errors import expect_error

Image = pytest.importorskip("PIL.Image")


@pytest.mark.parametrize("size", [(60, 40), (40, 60), (50, 50)])
def test_resize_scales_the_shorter_side_then_cuts_the_centre(tmp_path, size):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    got = files.decode_image(tmp_path / "p.png", (3, 28, 24), resize=32)
    w, h = size
    scaled = (32, round(32 * h / w) if h > w else 32) if w <= h else (int(32 * w / h), 32)
    im = Image.fromarray(pixels).resize(scaled, Image.BILINEAR)
    top, left = round((scaled[1] - 28) / 2), round((scaled[0] - 24) / 2)
    expected = np.asarray(im)[top : top + 28, left : left + 24].transpose(2, 0, 1)
    assert got.shape == (3, 28, 24) and np.array_equal(got, expected)


def test_resize_is_for_pictures_and_must_cover_the_input(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    expect_error(["inspect", cfg, "--set", "data.resize=32"], "data.resize applies to picture files")
    spec = yaml.safe_load(TINY)
    spec["data"].update(dataset="folder", root=str(tmp_path), resize=12)
    cfg.write_text(yaml.safe_dump(spec))
    expect_error(["inspect", cfg], "data.resize is 12", "at least 16 pixels")


def test_the_random_resized_crop_is_crop_then_bilinear_resize():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).integers(0, 256, (64, 3, 12, 10), dtype=np.uint8)
    top, left, bh, bw = augment.resized_crop_boxes(64, 12, 10, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(1))
    assert (top >= 0).all() and (top + bh <= 12).all() and (left + bw <= 10).all() and (bh * bw > 0).all()
    got = augment.resized_crop(x, top, left, bh, bw)
    for i in range(64):  # the reference, one image at a time: cut out, then torch's bilinear resize
        crop = torch.tensor(x[i : i + 1, :, top[i] : top[i] + bh[i], left[i] : left[i] + bw[i]].astype(np.float32))
        ref = torch.nn.functional.interpolate(crop, size=(12, 10), mode="bilinear", align_corners=False).numpy()
        assert np.abs(got[i].astype(np.float64) - ref[0]).max() <= 0.5 + 1e-4  # uint8 rounding
    whole = augment.resized_crop(x, np.zeros(64, int), np.zeros(64, int), np.full(64, 12), np.full(64, 10))
    assert np.array_equal(whole, x)
    floats = x.astype(np.float32) / 255
    assert np.allclose(augment.resized_crop(floats, top, left, bh, bw) * 255, got, atol=0.5 + 1e-3)


def test_a_folder_trains_with_resize_and_random_resized_crops_the_same_twice(tmp_path):
    g = np.random.default_rng(0)
    for k in range(2):
        (tmp_path / "img" / "train" / f"c{k}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(g.integers(0, 256, (30 + i, 20 + k * 15, 3), dtype=np.uint8)).save(
                tmp_path / "img" / "train" / f"c{k}" / f"{i}.png")
    spec = yaml.safe_load(TINY)
    spec["model"]["input_shape"] = [3, 16, 16]
    spec["model"]["layers"][-1]["units"] = 2
    spec["data"] = {"dataset": "folder", "root": str(tmp_path / "img"), "resize": 18, "batch_size": 4,
                    "val_split": 0.25, "augment": {"random_resized_crop": {}, "horizontal_flip": True}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    for runs in ("a", "b"):
        invoke("train", tmp_path / "c.yaml", "--runs-dir", tmp_path / runs)
    rows = [((tmp_path / r).glob("*/metrics.jsonl").__next__()).read_text() for r in ("a", "b")]
    strip = [[{k: v for k, v in yaml.safe_load(line).items() if k != "seconds"} for line in r.splitlines()]
             for r in rows]
    assert strip[0] == strip[1]
    expect_error(["inspect", tmp_path / "c.yaml", "--set", "data.augment.random_resized_crop.scale=[0.5, 0.2]"],
                 "scale as [min, max]")


def test_frozen_layers_run_forward_only_and_keep_nothing_for_backward(monkeypatch):
    from cnnctl.builder import build_model
    from cnnctl.config import ModelSpec

    spec = ModelSpec.model_validate({"input_shape": [3, 12, 12], "layers": [
        {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": 1, "bias": False, "trainable": False},
        {"type": "batchnorm", "activation": "relu", "trainable": False},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "residual", "trainable": False, "body": [
            {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": 1, "activation": "silu"}]},
        {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": 1, "activation": "relu"},
        {"type": "global_avgpool2d"}, {"type": "dense", "units": 3}]})
    model, _ = build_model(spec, np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((4, 3, 12, 12)).astype(np.float32)
    y = model.forward(x, training=True)
    model.backward(np.ones_like(y) / y.size)
    rows = model.plan(x.shape[1:]).describe(4)
    frozen = [r for r in rows if r["layer"].split(".")[1] in "0123"]
    assert frozen and all(r["forward_only"] and r["saved_bytes"] == 0 for r in frozen)
    assert all(not r["forward_only"] for r in rows if r["layer"].split(".")[1] in "456")
    assert model._keep["layers.0"] == {} and model._keep["layers.4"]  # the trained convolution keeps its input
    for name, layer in model.named_layers():
        if name and int(name.split(".")[1]) < 4:
            assert not any(isinstance(v, np.ndarray) for k, v in vars(layer).items() if k.startswith("_")), name
    assert model.layers[4].grads["weight"].any() and not model.layers[0].grads["weight"].any()
    # and the numbers are those of the same plan keeping everything (forward-only switched off)
    from cnnctl import plan

    monkeypatch.setattr(plan.Plan, "_forward_only", lambda self, model: set())
    again, _ = build_model(spec, np.random.default_rng(0))
    y2 = again.forward(x, training=True)
    again.backward(np.ones_like(y2) / y2.size)
    assert np.array_equal(y, y2) and again._keep["layers.0"]
    assert np.array_equal(again.layers[4].grads["weight"], model.layers[4].grads["weight"])


CACHED = """\
name: cached
seed: 4
data: {dataset: shapes, batch_size: 32, val_split: 0.2, shapes: {train_size: 400, test_size: 100}}
model:
  input_shape: [1, 16, 16]
  layers:
    - {type: conv2d, filters: 8, kernel_size: 3, padding: 1, bias: false, trainable: false}
    - {type: batchnorm, activation: relu, trainable: false}
    - {type: maxpool2d, kernel_size: 2}
    - {type: conv2d, filters: 8, kernel_size: 3, padding: 1, activation: relu}
    - {type: global_avgpool2d}
    - {type: dropout, rate: 0.2}
    - {type: dense, units: 4}
optimizer: {type: sgd, lr: 0.05, momentum: 0.9}
train: {epochs: 3, test_at_end: true}
"""


def _rows(run):
    import json

    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cache_frozen_trains_the_same_numbers_and_resumes_bit_exact(tmp_path):
    import json

    (tmp_path / "c.yaml").write_text(CACHED)
    invoke("train", tmp_path / "c.yaml", "--runs-dir", tmp_path / "plain")
    invoke("train", tmp_path / "c.yaml", "--set", "train.cache_frozen=true", "--runs-dir", tmp_path / "cached")
    (plain,), (cached,) = (list((tmp_path / d).iterdir()) for d in ("plain", "cached"))
    assert _rows(plain) == _rows(cached)  # the same numbers, bit for bit
    summaries = [json.loads((r / "summary.json").read_text()) for r in (plain, cached)]
    assert summaries[0]["test"] == summaries[1]["test"]
    # 2 epochs then resumed to 3: the cache is computed again from the checkpoint's weights
    invoke("train", tmp_path / "c.yaml", "--set", "train.cache_frozen=true", "--set", "train.epochs=2",
           "--runs-dir", tmp_path / "part")
    (part,) = list((tmp_path / "part").iterdir())
    invoke("train", "--resume", part, "--set", "train.epochs=3")
    assert _rows(part) == _rows(cached)


@pytest.mark.parametrize("change, words", [
    ("data.augment.horizontal_flip=true", ["data.augment changes the images every epoch"]),
    ("data.test_time_augment.horizontal_flip=true", ["several views of each image"]),
    ("train.unfreeze_at_epoch=2", ["makes the frozen layers train"]),
    ("model.layers.0.trainable=true", ["model.layers[0] trains, so there is no frozen prefix"]),
    ("model.layers.2={type: dropout2d, rate: 0.1}", ["model.layers.2 (dropout) lies in the frozen prefix"]),
])
def test_cache_frozen_refuses_what_changes_the_prefix(tmp_path, change, words):
    (tmp_path / "c.yaml").write_text(CACHED)
    expect_error(["train", tmp_path / "c.yaml", "--set", "train.cache_frozen=true", "--set", change, "--runs-dir",
                  tmp_path / "r"], "cache_frozen", *words)
