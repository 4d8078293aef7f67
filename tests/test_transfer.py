"""Fine-tuning on one's own pictures: data.resize (torchvision's evaluation transform), the random resized crop
(its training transform), and frozen layers."""

import numpy as np
import pytest
import yaml

from cnnctl.data import augment, pictures
from tests.conftest import ROOT, TINY
from tests.helpers import invoke
from tests.test_errors import expect_error

Image = pytest.importorskip("PIL.Image")


@pytest.mark.parametrize("size", [(60, 40), (40, 60), (50, 50)])
def test_resize_scales_the_shorter_side_then_cuts_the_centre(tmp_path, size):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    got = pictures.decode_image(tmp_path / "p.png", (3, 28, 24), resize=32)
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
    from cnnctl.config.build import build_model
    from cnnctl.config.spec import ModelSpec
    from cnnctl.core.plan import Runner

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
    run = Runner(model)
    y = run.forward(x, training=True)
    run.backward(np.ones_like(y) / y.size)
    rows = run.plan(x.shape[1:]).describe(4)
    frozen = [r for r in rows if r["layer"].split(".")[1] in "0123"]
    assert frozen and all(r["forward_only"] and r["saved_bytes"] == 0 for r in frozen)
    assert all(not r["forward_only"] for r in rows if r["layer"].split(".")[1] in "456")
    assert run._keep["layers.0"] == {} and run._keep["layers.4"]  # the trained convolution keeps its input
    for name, layer in model.named_layers():
        if name and int(name.split(".")[1]) < 4:
            assert not any(isinstance(v, np.ndarray) for k, v in vars(layer).items() if k.startswith("_")), name
    assert model.layers[4].grads["weight"].any() and not model.layers[0].grads["weight"].any()
    # and the numbers are those of the same plan keeping everything (forward-only switched off)
    from cnnctl.core import plan

    monkeypatch.setattr(plan.Plan, "_forward_only", lambda self, model: set())
    again, _ = build_model(spec, np.random.default_rng(0))
    run2 = Runner(again)
    y2 = run2.forward(x, training=True)
    run2.backward(np.ones_like(y2) / y2.size)
    assert np.array_equal(y, y2) and run2._keep["layers.0"]
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


# ---------------------------------------------------------------- torchvision's state dicts, by their own names

def _torchvision_models():
    """ResNet-18, ResNet-50 and MobileNetV2 written as torchvision writes them: the same module names, so the same
    state-dict names (conv1, bn1, layer1.0.downsample.0, features.3.conv.1.0, classifier.1, ...)."""
    torch = pytest.importorskip("torch")
    tnn = torch.nn

    class Basic(tnn.Module):
        expansion = 1

        def __init__(self, inp, planes, stride, down):
            super().__init__()
            self.conv1, self.bn1 = tnn.Conv2d(inp, planes, 3, stride, 1, bias=False), tnn.BatchNorm2d(planes)
            self.conv2, self.bn2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False), tnn.BatchNorm2d(planes)
            self.relu, self.downsample = tnn.ReLU(), down

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class Bottleneck(tnn.Module):
        expansion = 4

        def __init__(self, inp, planes, stride, down):
            super().__init__()
            self.conv1, self.bn1 = tnn.Conv2d(inp, planes, 1, bias=False), tnn.BatchNorm2d(planes)
            self.conv2, self.bn2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False), tnn.BatchNorm2d(planes)
            self.conv3, self.bn3 = tnn.Conv2d(planes, planes * 4, 1, bias=False), tnn.BatchNorm2d(planes * 4)
            self.relu, self.downsample = tnn.ReLU(), down

        def forward(self, x):
            out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet(tnn.Module):
        def __init__(self, block, counts):
            super().__init__()
            self.conv1, self.bn1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False), tnn.BatchNorm2d(64)
            self.relu, self.maxpool = tnn.ReLU(), tnn.MaxPool2d(3, 2, 1)
            inp = 64
            for k, (n, planes) in enumerate(zip(counts, (64, 128, 256, 512))):
                blocks = []
                for i in range(n):
                    stride = 2 if k and not i else 1
                    down = None
                    if stride != 1 or inp != planes * block.expansion:
                        down = tnn.Sequential(tnn.Conv2d(inp, planes * block.expansion, 1, stride, bias=False),
                                              tnn.BatchNorm2d(planes * block.expansion))
                    blocks.append(block(inp, planes, stride, down))
                    inp = planes * block.expansion
                setattr(self, f"layer{k + 1}", tnn.Sequential(*blocks))
            self.avgpool, self.fc = tnn.AdaptiveAvgPool2d(1), tnn.Linear(inp, 1000)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    def cna(inp, out, k, stride=1, groups=1):  # torchvision's Conv2dNormActivation
        return tnn.Sequential(tnn.Conv2d(inp, out, k, stride, (k - 1) // 2, groups=groups, bias=False),
                              tnn.BatchNorm2d(out), tnn.ReLU6())

    class Inverted(tnn.Module):
        def __init__(self, inp, oup, stride, t):
            super().__init__()
            hidden, self.use_res = inp * t, stride == 1 and inp == oup
            layers = [] if t == 1 else [cna(inp, hidden, 1)]
            layers += [cna(hidden, hidden, 3, stride, hidden), tnn.Conv2d(hidden, oup, 1, bias=False),
                       tnn.BatchNorm2d(oup)]
            self.conv = tnn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(tnn.Module):
        def __init__(self):
            super().__init__()
            features, inp = [cna(3, 32, 3, 2)], 32
            for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                               (6, 160, 3, 2), (6, 320, 1, 1)]:
                for i in range(n):
                    features.append(Inverted(inp, c, s if i == 0 else 1, t))
                    inp = c
            self.features = tnn.Sequential(*features, cna(320, 1280, 1))
            self.classifier = tnn.Sequential(tnn.Dropout(0.2), tnn.Linear(1280, 1000))

        def forward(self, x):
            return self.classifier(torch.flatten(tnn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    return torch, {"resnet18": lambda: ResNet(Basic, [2, 2, 2, 2]),
                   "resnet50": lambda: ResNet(Bottleneck, [3, 4, 6, 3]), "mobilenet_v2": MobileNetV2}


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_state_dicts_load_into_the_shipped_configs_by_their_maps(tmp_path, name):
    from safetensors.torch import save_file

    from cnnctl.config.build import build_model
    from cnnctl.config.reading import load_config
    from cnnctl.run.weights import init_from

    torch, models = _torchvision_models()
    torch.manual_seed(0)
    net = models[name]().eval()
    with torch.no_grad():  # statistics away from 0 and 1, so that mapping them counts
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2)
    save_file(net.state_dict(), str(tmp_path / f"{name}.safetensors"))
    spec, _ = load_config(ROOT / "configs" / "torchvision" / f"{name}.yaml", ["model.input_shape=[3, 64, 64]"])
    model, _ = build_model(spec.model, np.random.default_rng(0))
    report = init_from(model, str(tmp_path / f"{name}.safetensors"), True, spec.model.init_from.rename)
    assert not report["fresh"] and not report["unused"] and len(report["copied"]) == len(net.state_dict())
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = model.forward(x, training=False)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_init_from_renames_reports_by_name_and_refuses_collisions(tmp_path):
    from safetensors.numpy import save_file

    spec = yaml.safe_load(TINY)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    g = np.random.default_rng(0)
    save_file({"features.0.weight": g.standard_normal((4, 1, 3, 3)).astype(np.float32),
               "features.0.bias": np.zeros(4, np.float32), "head.weight": np.zeros((7, 256), np.float32),
               "extra.thing": np.zeros(2, np.float32)}, str(tmp_path / "sd.safetensors"))
    rules = '[["^features\\\\.", "layers."], ["^head\\\\.", "layers.4."]]'
    res = invoke("train", tmp_path / "c.yaml", "--set", f"model.init_from.path={tmp_path / 'sd.safetensors'}",
                 "--set", f"model.init_from.rename={rules}", "--runs-dir", tmp_path / "runs")  # path: = checkpoint:
    out = res.output
    assert "(3 tensors renamed by model.init_from.rename): copied 2 of 4" in out
    assert "fresh: layers.4.weight (shape (7, 256) in the file, (4, 256) here)" in out
    assert "unused: extra.thing" in out
    expect_error(["inspect", tmp_path / "c.yaml", "--set", "model.init_from={checkpoint: x, rename: [['(', 'y']]}"],
                 "is not a regular expression")
    expect_error(["inspect", tmp_path / "c.yaml", "--set", "model.init_from={checkpoint: x, rename: resnet}"],
                 "model.init_from.rename", "torchvision_resnet")
    expect_error(["train", tmp_path / "c.yaml", "--set", f"model.init_from.checkpoint={tmp_path / 'sd.safetensors'}",
                  "--set", "model.init_from.rename=[['^.*$', 'same']]", "--runs-dir", tmp_path / "r2"],
                 "both become same")


def test_the_transfer_config_fine_tunes_torchvisions_resnet18_on_a_folder(tmp_path):
    from safetensors.torch import save_file

    torch, models = _torchvision_models()
    torch.manual_seed(0)
    save_file(models["resnet18"]().state_dict(), str(tmp_path / "resnet18.safetensors"))
    g = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 2)):
        for k in range(2):
            (tmp_path / "img" / split / f"c{k}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(g.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(
                    tmp_path / "img" / split / f"c{k}" / f"{i}.jpg")
    res = invoke("train", ROOT / "configs" / "transfer-folder.yaml", "--set", f"data.root={tmp_path / 'img'}",
                 "--set", f"model.init_from.checkpoint={tmp_path / 'resnet18.safetensors'}", "--set",
                 "model.input_shape=[3, 48, 48]", "--set", "data.resize=56", "--set", "train.epochs=1", "--set",
                 "data.batch_size=4", "--runs-dir", tmp_path / "runs")
    assert "(122 tensors renamed by model.init_from.rename): copied 120 of 122 parameters and buffers" in res.output
    assert "fresh: layers.8.weight (shape (1000, 512) in the file, (2, 512) here)" in res.output
    assert "test accuracy" in res.output
