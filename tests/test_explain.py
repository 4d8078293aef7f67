"""Saliency and Grad-CAM equal torch autograd on the converted model (tests/torch_models.py); occlusion equals a
direct loop over inputs and squares."""

from pathlib import Path

import numpy as np
import pytest

from cnnctl.config.build import build_model
from cnnctl.config.reading import load_config
from cnnctl.tools import explain
from tests.cases import randomize_params
from tests.conftest import ROOT

torch = pytest.importorskip("torch")
from tests.torch_models import loaded  # noqa: E402

CONFIGS = ["lenet5-mnist.yaml", "resnet20-cifar10.yaml", "mobilenet-fashion.yaml"]


def _model(config):
    spec, _ = load_config(ROOT / "configs" / config)
    g = np.random.default_rng(0)
    model, _ = build_model(spec.model, g)
    randomize_params(model, g, statistics=True)  # batchnorm in inference form with statistics of its own
    x = g.standard_normal((3, *spec.model.input_shape)).astype(np.float32)
    return model, x


def _close(ours, ref):
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1e-12), np.abs(ours - ref).max()


@pytest.mark.parametrize("config", CONFIGS)
def test_saliency_equals_torch_autograd(config):
    model, x = _model(config)
    ours, ks = explain.saliency(model, x)
    net = loaded(model).eval()
    xt = torch.tensor(x, requires_grad=True)
    out = net(xt)
    assert np.array_equal(ks, out.argmax(1).numpy())
    out[torch.arange(len(x)), torch.tensor(ks)].sum().backward()
    _close(ours, xt.grad.abs().amax(1).numpy())
    ours_k, _ = explain.saliency(model, x, k=1)  # another class, given
    xt.grad = None
    net(xt)[:, 1].sum().backward()
    _close(ours_k, xt.grad.abs().amax(1).numpy())


@pytest.mark.parametrize("config", CONFIGS)
def test_gradcam_equals_torch_autograd(config):
    model, x = _model(config)
    ours, ks, layer = explain.gradcam(model, x)
    assert layer == explain.spatial_layers(model, x.shape[1:])[-1]
    net = loaded(model).eval()
    kept = {}

    def keep(module, inputs, output):
        output.retain_grad()
        kept["a"] = output

    net.layers[int(layer.split(".")[1])].register_forward_hook(keep)
    out = net(torch.tensor(x))
    out[torch.arange(len(x)), torch.tensor(ks)].sum().backward()
    a = kept["a"]
    cam = torch.relu((a.grad.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    ref = torch.nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    _close(ours, ref.detach().numpy())


def test_gradcam_takes_another_layer_and_names_the_ones_it_can():
    from cnnctl.errors import CnnctlError

    model, x = _model("lenet5-mnist.yaml")
    maps, _, layer = explain.gradcam(model, x, layer="layers.0")
    assert layer == "layers.0" and maps.shape == (3, 28, 28)
    with pytest.raises(CnnctlError, match="one of: layers.0, layers.1, layers.2, layers.3"):
        explain.gradcam(model, x, layer="layers.5")


def test_occlusion_equals_a_direct_loop():
    from cnnctl.core.functional import softmax

    model, x = _model("lenet5-mnist.yaml")
    model.to(np.float64)  # in float64 the batches' compositions do not show in the sums
    x = x.astype(np.float64)
    ours, ks = explain.occlusion(model, x, patch=10, stride=7, batch=5)
    p = softmax(model.forward(x, training=False), axis=1)
    n, _, h, w = x.shape
    ref, cover = np.zeros((n, h, w)), np.zeros((h, w))
    starts = [0, 7, 14, 18]  # every 7 pixels, and the last square flush with the edge (28 - 10)
    for i in range(n):
        for t in starts:
            for left in starts:
                copy = x[i : i + 1].copy()
                copy[:, :, t : t + 10, left : left + 10] = 0
                q = softmax(model.forward(copy, training=False), axis=1)[0, ks[i]]
                ref[i, t : t + 10, left : left + 10] += p[i, ks[i]] - q
                if i == 0:
                    cover[t : t + 10, left : left + 10] += 1
    np.testing.assert_allclose(ours, ref / cover, rtol=1e-5, atol=1e-7)


def test_occlusion_reports_the_squares_it_has_done():
    model, x = _model("lenet5-mnist.yaml")
    heard = []
    plain, _ = explain.occlusion(model, x, patch=10, stride=7, batch=2 * len(x))
    told, _ = explain.occlusion(model, x, patch=10, stride=7, batch=2 * len(x),
                                progress=lambda done, total: heard.append((done, total)))
    assert heard == [(2, 16), (4, 16), (6, 16), (8, 16), (10, 16), (12, 16), (14, 16), (16, 16)]  # 4 x 4 squares
    np.testing.assert_array_equal(told, plain)


def test_the_explain_verb_writes_pictures_and_maps_for_every_method(tmp_path):
    import json

    import yaml

    from tests.conftest import TINY
    from tests.helpers import invoke
    from tests.test_errors import expect_error

    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    spec = yaml.safe_load(TINY)
    spec["train"]["epochs"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    invoke("train", tmp_path / "c.yaml", "--runs-dir", tmp_path / "runs")
    (run,) = (tmp_path / "runs").iterdir()
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).integers(0, 256, (2, 16, 16), dtype=np.uint8))
    res = json.loads(invoke("explain", run, tmp_path / "x.npz", "--method", "saliency", "--method", "gradcam",
                            "--method", "occlusion", "--patch", "4", "--npy", "--out", tmp_path / "ex",
                            "--json").stdout)
    assert len(res) == 2 and [e["method"] for e in res[0]["explained"]] == ["saliency", "gradcam", "occlusion"]
    assert res[0]["explained"][1]["layer"] == "layers.1"  # the last layer with feature maps: the pooling
    for e in res[0]["explained"] + res[1]["explained"]:
        with Image.open(e["png"]) as im:
            assert im.size[0] > 100
        assert np.load(e["npy"], allow_pickle=False).shape == (16, 16)
    text = invoke("explain", run, tmp_path / "x.npz", "--out", tmp_path / "ex2").output
    assert "x.npz_0_.saliency.png" in text
    expect_error(["explain", run, tmp_path / "x.npz", "--class", "9", "--out", tmp_path / "e3"], "classes 0..3")
    expect_error(["explain", run, tmp_path / "x.npz", "--method", "gradcam", "--layer", "layers.4", "--out",
                  tmp_path / "e3"], "one of: layers.0, layers.1")
    expect_error(["explain", run, tmp_path / "x.npz", "--method", "lime"], "use one of saliency, gradcam, occlusion")


def test_picture_stems_never_collide():
    from cnnctl.tools.explain import picture_stems

    names = ["x.png", "x.png", "a:b.png", "a_b.png", "X.PNG", "2-x.png", "", "ok.png"]
    stems = picture_stems(names)
    assert len({s.casefold() for s in stems}) == len(names)
    assert stems[-1] == "ok.png" and stems[0] != stems[1]


def test_two_inputs_of_the_same_name_get_pictures_of_their_own(tmp_path, tiny_run):
    import json

    from tests.helpers import invoke

    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    g = np.random.default_rng(0)
    inputs = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(g.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / folder / "x.png")
        inputs.append(tmp_path / folder / "x.png")
    res = json.loads(invoke("explain", tiny_run, *inputs, "--npy", "--out", tmp_path / "ex", "--json").stdout)
    files = [e["png"] for r in res for e in r["explained"]] + [e["npy"] for r in res for e in r["explained"]]
    assert len(set(files)) == 4 and all(Path(f).is_file() for f in files)
    maps = [np.load(e["npy"]) for r in res for e in r["explained"]]
    direct = [json.loads(invoke("explain", tiny_run, p, "--npy", "--out", tmp_path / f"one{i}", "--json").stdout)
              for i, p in enumerate(inputs)]
    for m, d in zip(maps, direct):  # each input's files hold its own map
        np.testing.assert_array_equal(m, np.load(d[0]["explained"][0]["npy"]))
