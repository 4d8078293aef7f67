"""cnnctl import: networks built in torch with random weights, exported with torch.onnx.export, imported, and run
by cnnctl: outputs equal onnxruntime's to 1e-4 of the largest; every shipped config survives export -> import;
graphs cnnctl cannot take are one message naming what is in the way."""

import json
import re

import numpy as np
import pytest
import yaml

from cnnctl.config.build import build_model
from cnnctl.config.reading import load_config
from cnnctl.interop import onnx_import
from cnnctl.interop.export import to_onnx
from tests.conftest import ROOT
from tests.helpers import invoke
from tests.test_errors import expect_error

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
nn = torch.nn


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # statistics and affine parameters away from the defaults, so that mapping them counts
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class Basic(nn.Module):  # torchvision's BasicBlock
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _bn(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _bn(cout))
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):  # torchvision's Bottleneck (stride on the 3x3)
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.body = nn.Sequential(nn.Conv2d(cin, width, 1, bias=False), _bn(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride, 1, bias=False), _bn(width), nn.ReLU(),
                                  nn.Conv2d(width, cout, 1, bias=False), _bn(cout))
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + (x if self.down is None else self.down(x)))


def resnet(block, counts, classes=10):
    layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), _bn(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for stage, (n, width) in enumerate(zip(counts, (64, 128, 256, 512))):
        for i in range(n):
            b = block(cin, width, 2 if stage and not i else 1)
            layers.append(b)
            cin = width * (4 if block is Bottleneck else 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def vgg11(classes=10):
    cfg, layers, cin = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, classes))


class DenseLayer(nn.Module):  # DenseNet-BC: BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, the input concatenated
    def __init__(self, cin, growth):
        super().__init__()
        self.f = nn.Sequential(_bn(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False), _bn(4 * growth),
                               nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.f(x)], 1)


def densenet(classes=10, growth=8):
    layers, c = [nn.Conv2d(3, 16, 3, padding=1, bias=False)], 16
    for block in range(2):
        for _ in range(3):
            layers.append(DenseLayer(c, growth))
            c += growth
        if block == 0:
            layers += [_bn(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
            c //= 2
    return nn.Sequential(*layers, _bn(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


class Fire(nn.Module):  # SqueezeNet's fire module
    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, e1, 1), nn.ReLU())
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, e3, 3, padding=1), nn.ReLU())

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.e1(x), self.e3(x)], 1)


def squeezenet11(classes=10):  # torchvision's squeezenet1_1, ceil-mode pooling and all
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, 2), nn.ReLU(), pool(), Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(), Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
        Fire(384, 64, 256, 256), Fire(512, 64, 256, 256), nn.Dropout(0.5), nn.Conv2d(512, classes, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


class InvertedResidual(nn.Module):  # torchvision's MobileNetV2 block: expand, depthwise, project (ReLU6)
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [nn.Conv2d(cin, hidden, 1, bias=False), _bn(hidden), nn.ReLU6()]
        self.f = nn.Sequential(*layers, nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                               _bn(hidden), nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), _bn(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.f(x) if self.residual else self.f(x)


def mobilenet_v2(classes=10):
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]
    layers, cin = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), _bn(32), nn.ReLU6()], 32
    for t, c, n, s in settings:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    return nn.Sequential(*layers, nn.Conv2d(cin, 1280, 1, bias=False), _bn(1280), nn.ReLU6(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, classes))


class SqueezeExcite(nn.Module):  # torchvision's SqueezeExcitation: 1x1 convolutions on the pooled channels
    def __init__(self, c, squeeze, act=nn.ReLU, scale=nn.Hardsigmoid):
        super().__init__()
        self.fc1, self.fc2, self.act, self.scale = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1), act(), scale()

    def forward(self, x):
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.scale(self.fc2(self.act(self.fc1(s)))) * x


class MBConv(nn.Module):  # MobileNetV3's and EfficientNet's block: expand, depthwise, squeeze-excite, project
    def __init__(self, cin, cout, k, stride, expanded, act, se, se_act=nn.ReLU, se_scale=nn.Hardsigmoid):
        super().__init__()
        layers = [] if expanded == cin else [nn.Conv2d(cin, expanded, 1, bias=False), _bn(expanded), act()]
        layers += [nn.Conv2d(expanded, expanded, k, stride, k // 2, groups=expanded, bias=False), _bn(expanded),
                   act()]
        if se:
            layers.append(SqueezeExcite(expanded, max(8, expanded // 4), se_act, se_scale))
        self.f = nn.Sequential(*layers, nn.Conv2d(expanded, cout, 1, bias=False), _bn(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.f(x) if self.residual else self.f(x)


def mobilenet_v3_small(classes=10):  # torchvision's mobilenet_v3_small settings
    hs, re = nn.Hardswish, nn.ReLU
    settings = [(3, 16, 16, True, re, 2), (3, 72, 24, False, re, 2), (3, 88, 24, False, re, 1),
                (5, 96, 40, True, hs, 2), (5, 240, 40, True, hs, 1), (5, 240, 40, True, hs, 1),
                (5, 120, 48, True, hs, 1), (5, 144, 48, True, hs, 1), (5, 288, 96, True, hs, 2),
                (5, 576, 96, True, hs, 1), (5, 576, 96, True, hs, 1)]
    layers, cin = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), _bn(16), hs()], 16
    for k, exp, c, se, act, s in settings:
        layers.append(MBConv(cin, c, k, s, exp, act, se))
        cin = c
    return nn.Sequential(*layers, nn.Conv2d(cin, 576, 1, bias=False), _bn(576), hs(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(576, 1024), hs(), nn.Dropout(0.2), nn.Linear(1024, classes))


def efficientnet_b0_style(classes=10):  # EfficientNet-B0's stages (one block each): SiLU, sigmoid gating
    settings = [(1, 3, 16, 1), (6, 3, 24, 2), (6, 5, 40, 2), (6, 3, 80, 2), (6, 5, 112, 1), (6, 5, 192, 2),
                (6, 3, 320, 1)]
    layers, cin = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), _bn(32), nn.SiLU()], 32
    for t, k, c, s in settings:
        layers.append(MBConv(cin, c, k, s, cin * t, nn.SiLU, True, nn.SiLU, nn.Sigmoid))
        layers.append(MBConv(c, c, k, 1, c * t, nn.SiLU, True, nn.SiLU, nn.Sigmoid))
        cin = c
    return nn.Sequential(*layers, nn.Conv2d(cin, 1280, 1, bias=False), _bn(1280), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, classes))


class ViewFlatten(nn.Module):  # x.view(x.size(0), -1): the Shape/Gather/Unsqueeze/Concat/Reshape chain
    def forward(self, x):
        return x.view(x.size(0), -1)


def small_cnn(end=None, act=nn.ReLU):
    layers = [nn.Conv2d(1, 6, 5, padding=2), act(), nn.AvgPool2d(2), nn.Conv2d(6, 8, 3, stride=2, dilation=2),
              nn.Tanh(), ViewFlatten(), nn.Linear(8 * 3 * 3, 16), nn.Sigmoid(), nn.Linear(16, 4)]
    return nn.Sequential(*layers, *([end] if end is not None else []))


NETWORKS = {  # name: (builder, input shape (C, H, W), whether to keep batchnorm as its own layer)
    "resnet18": (lambda: resnet(Basic, [2, 2, 2, 2]), (3, 64, 64), True),
    "resnet18-bn-folded": (lambda: resnet(Basic, [2, 2, 2, 2]), (3, 64, 64), False),
    "resnet50": (lambda: resnet(Bottleneck, [3, 4, 6, 3]), (3, 32, 32), True),
    "vgg11": (vgg11, (3, 32, 32), False),
    "mobilenet_v2": (mobilenet_v2, (3, 32, 32), True),
    "mobilenet_v3_small": (mobilenet_v3_small, (3, 64, 64), True),
    "efficientnet_b0_style": (efficientnet_b0_style, (3, 64, 64), True),
    "small-silu-hardswish": (lambda: small_cnn(act=nn.SiLU).append(nn.Hardswish()), (1, 20, 20), False),
    "small-hardsigmoid": (lambda: small_cnn(act=nn.Hardsigmoid), (1, 20, 20), False),
    "small-gelu": (lambda: small_cnn(act=nn.GELU), (1, 20, 20), False),
    "small-mish": (lambda: small_cnn(act=nn.Mish), (1, 20, 20), False),
    "densenet": (densenet, (3, 16, 16), True),
    "squeezenet1_1": (squeezenet11, (3, 63, 63), False),
    "small-view-flatten": (small_cnn, (1, 20, 20), False),
    "small-leaky-logsoftmax": (lambda: small_cnn(nn.LogSoftmax(1), lambda: nn.LeakyReLU(0.2)), (1, 20, 20), False),
    "small-elu-softmax": (lambda: small_cnn(nn.Softmax(1), nn.ELU), (1, 20, 20), False),
}


def export(net, shape, path, keep_batchnorm=False, **kw):
    torch.manual_seed(0)
    net = net.eval()
    torch.onnx.export(net, torch.zeros(1, *shape), str(path), dynamo=False, input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "N"}, "output": {0: "N"}},
                      opset_version=kw.pop("opset", 17), do_constant_folding=not keep_batchnorm, **kw)
    return path


def assert_equal_to_onnxruntime(path, model, shape, normalization=None):
    x = np.random.default_rng(1).random((3, *shape), dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    if normalization:  # the graph normalises its 0..1 input itself; cnnctl's predict does it before the model
        c = shape[0]
        x = (x - np.reshape(normalization["mean"], (1, c, 1, 1))) / np.reshape(normalization["std"], (1, c, 1, 1))
    got = model.forward(x.astype(np.float32), training=False)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(got - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("name", NETWORKS)
def test_torch_networks_import_exactly(tmp_path, name):
    make, shape, keep_bn = NETWORKS[name]
    torch.manual_seed(0)
    path = export(make(), shape, tmp_path / f"{name}.onnx", keep_bn)
    spec_dict, spec, model, rows, norm, classes, imp = onnx_import.build(path, name, None, None, None)
    if "softmax" in name:  # the final softmax is left to the loss: cnnctl's outputs are its logits
        import onnxruntime

        x = np.random.default_rng(1).random((3, *shape), dtype=np.float32)
        ref = onnxruntime.InferenceSession(str(path)).run(None, {"input": x})[0]
        got = model.forward(x, training=False)
        probs = np.exp(got) if imp.final == "log_softmax" else np.exp(got - got.max(1, keepdims=True))
        probs = probs if imp.final == "log_softmax" else probs / probs.sum(1, keepdims=True)
        expected = np.exp(ref) if imp.final == "log_softmax" else ref
        assert np.abs(probs - expected).max() < 1e-5
    else:
        assert_equal_to_onnxruntime(path, model, shape)
    kinds = {r.type.split(" ")[0].rsplit("_", 1)[0] if r.type.split(" ")[0][-1].isdigit() else r.type
             for r in _walk(rows)}  # a repeated block (residual_1 x3) counts as its container's type
    if name.startswith("resnet"):
        assert "residual" in kinds and ("batchnorm" in kinds) == keep_bn
    if name in ("densenet", "squeezenet1_1"):
        assert "concat" in kinds
    if name == "mobilenet_v2":
        assert {"residual", "batchnorm"} <= kinds and any(spec.get("groups", 1) > 1 for spec in _specs(imp.layers))
        assert any(spec.get("activation") == "relu6" for spec in _specs(imp.layers))
    if name in ("mobilenet_v3_small", "efficientnet_b0_style"):
        assert "gate" in kinds and "residual" in kinds
    if name == "small-gelu":
        assert imp.layers[0]["activation"] == "gelu"
    if name == "small-mish":
        assert imp.layers[0]["activation"] == "mish"
    if name == "small-silu-hardswish":
        assert imp.layers[0]["activation"] == "silu" and imp.layers[-1]["activation"] == "hardswish"


def _specs(layers):
    for spec in layers:
        yield spec
        for key in ("body", "shortcut"):
            if isinstance(spec.get(key), list):
                yield from _specs(spec[key])
        for branch in spec.get("branches", []):
            yield from _specs(branch)


def _walk(rows):
    for r in rows:
        yield from r.walk()


def test_the_cli_writes_a_config_and_checkpoint_every_verb_takes(tmp_path):
    net = resnet(Basic, [1, 1, 1, 1], classes=3)
    path = export(net, (3, 32, 32), tmp_path / "r.onnx", keep_batchnorm=True)
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    res = invoke("import", path, "--out", tmp_path / "imp", "--classes", tmp_path / "classes.txt",
                 "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")
    assert "mapped" in res.output and "wrote" in res.output
    text = (tmp_path / "imp" / "config.yaml").read_text()
    assert "type: residual" in text and "# fill in" in text and "mean: [0.485, 0.456, 0.406]" in text
    spec, _ = load_config(tmp_path / "imp" / "config.yaml")  # the written config is a valid cnnctl config
    ckpt = tmp_path / "imp" / "model.safetensors"
    info = json.loads(invoke("inspect", ckpt, "--json").output)
    assert info["total_params"] == sum(p.numel() for p in net.parameters())  # as torch counts them
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    preds = json.loads(invoke("predict", ckpt, tmp_path / "x.npz", "--json").output)
    assert {t["class"] for t in preds[0]["top"]} == {"cat", "dog", "bird"}
    invoke("export", ckpt, "--out", tmp_path / "back.onnx")  # and back to ONNX: the same numbers again
    x01 = np.random.default_rng(2).random((2, 3, 32, 32), dtype=np.float32)
    again = ort.InferenceSession(str(tmp_path / "back.onnx")).run(None, {"input": x01})[0]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    first = ort.InferenceSession(str(path)).run(None, {"input": ((x01 - mean[:, None, None]) / std[:, None, None])
                                                       .astype(np.float32)})[0]
    assert np.abs(again - first).max() <= 1e-4 * np.abs(first).max()


class _Shuffle(nn.Module):
    """torchvision's ShuffleNet channel_shuffle: view, transpose, view."""

    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


def alexnet_style(path):
    """An AlexNet-style graph as Caffe's converters write it: LRN after the first two convolutions (torch's own
    export writes LocalResponseNorm out in a dozen nodes with an If)."""
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("LRN", ["r1"], ["n1"], size=5, alpha=1e-2, beta=0.75, bias=2.0),
             helper.make_node("MaxPool", ["n1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("LRN", ["r2"], ["n2"], size=3),
             helper.make_node("MaxPool", ["n2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p2"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["output"], transB=1)]
    inits = {"w1": g.standard_normal((8, 1, 3, 3)) * 0.5, "b1": g.standard_normal(8) * 0.1,
             "w2": g.standard_normal((8, 8, 3, 3)) * 0.2, "b2": g.standard_normal(8) * 0.1,
             "fw": g.standard_normal((4, 8 * 5 * 5)) * 0.1, "fb": np.zeros(4)}
    graph = helper.make_graph(nodes, "alexnet-style", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                     ["N", 1, 20, 20])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString())
    return path


class _V2Unit(nn.Module):
    """torchvision's ShuffleNetV2 unit at stride 1: half the channels pass, the other half go through a 1x1, a 3x3
    depthwise and a 1x1 convolution; concatenated, then shuffled."""

    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                                    nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
                                    nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU())
        self.shuffle = _Shuffle(2)

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return self.shuffle(torch.cat((x1, self.branch(x2)), dim=1))


class _NormScale(nn.Module):
    """ConvNeXt's LayerNorm over the channels (permuted to channels last and back) and a per-channel layer scale."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, c).view(c, 1, 1))

    def forward(self, x):
        return self.gamma * self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def shufflenet_style():  # ShuffleNet's grouped convolutions and shuffle, a ShuffleNetV2 unit (its split), then
    # ConvNeXt's channel LayerNorm and layer scale: every layer import adds, so fine-tuning goes back through each
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 1, groups=2), _Shuffle(2), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1, groups=2), nn.ReLU(), _V2Unit(8), _NormScale(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.parametrize("make, layers", [(small_cnn, []), (alexnet_style, ["lrn"]),
                                          (shufflenet_style, ["channel_shuffle", "split", "layernorm2d",
                                                              "scale"])],
                         ids=["small", "lrn", "shuffle"])
def test_a_folder_of_images_fine_tunes_an_imported_network(tmp_path, make, layers):
    """Fine-tuned from the import (backward through every layer, the new ones too), resumed bit for bit, exported
    back and equal to onnxruntime."""
    pytest.importorskip("PIL")
    from PIL import Image

    path = make(tmp_path / "s.onnx") if make is alexnet_style else \
        export(make(), (1, 20, 20), tmp_path / "s.onnx", keep_batchnorm=True)
    invoke("import", path, "--out", tmp_path / "imp")
    for layer in layers:
        assert f"type: {layer}" in (tmp_path / "imp" / "config.yaml").read_text()
    g = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for k in range(4):
            (tmp_path / "img" / split / f"c{k}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(g.integers(0, 256, (20, 20), dtype=np.uint8)).save(
                    tmp_path / "img" / split / f"c{k}" / f"{i}.png")
    cfg = yaml.safe_load((tmp_path / "imp" / "config.yaml").read_text())
    cfg["data"].update(root=str(tmp_path / "img"), batch_size=8, val_split=0.25)
    cfg["train"] = {"epochs": 2}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(cfg))
    res = invoke("train", tmp_path / "ft.yaml", "--init-from", tmp_path / "imp" / "model.safetensors",
                 "--runs-dir", tmp_path / "runs")
    copied = re.search(r"copied (\d+) of (\d+) parameters and buffers", res.output)
    assert copied and copied[1] == copied[2], res.output
    # resumed: 1 epoch, then on to 2, equals the 2 epochs straight, bit for bit
    invoke("train", tmp_path / "ft.yaml", "--init-from", tmp_path / "imp" / "model.safetensors", "--set",
           "train.epochs=1", "--runs-dir", tmp_path / "part")
    (part,), (straight,) = (list((tmp_path / d).iterdir()) for d in ("part", "runs"))
    invoke("train", "--resume", part, "--set", "train.epochs=2")
    rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (part, straight)]
    assert rows[0] == rows[1]
    # and exported back to ONNX: onnxruntime gives what cnnctl's model gives
    invoke("export", straight, "--out", tmp_path / "back.onnx")
    x01 = np.random.default_rng(3).random((4, 1, 20, 20), dtype=np.float32)
    from cnnctl.run import checkpoint, loading
    from cnnctl.tools import predict

    ckpt = checkpoint.load(straight / "checkpoints" / "best.safetensors")
    _, model, _ = loading.load_model(ckpt, straight)
    ours = model.forward(predict.normalize(x01, ckpt.normalization), training=False)
    theirs = ort.InferenceSession(str(tmp_path / "back.onnx")).run(None, {"input": x01})[0]
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(ours).max()


EVERY_KIND = """\
name: kinds
data: {dataset: shapes, shapes: {train_size: 40, test_size: 8}}
model:
  input_shape: [1, 16, 16]
  layers:
    - {type: conv2d, filters: 8, kernel_size: 3, padding: 1, bias: false}
    - {type: batchnorm, activation: hardswish}
    - type: residual
      body:
        - {type: conv2d, filters: 8, kernel_size: 3, padding: [0, 2, 1, 1], groups: depthwise, activation: gelu}
        - {type: silu}
        - {type: gate, branch: [{type: global_avgpool2d}, {type: dense, units: 4, activation: relu6},
                                {type: dense, units: 8, activation: hardsigmoid}]}
    - {type: concat, branches: [[], [{type: conv2d, filters: 4, kernel_size: 1, activation: elu}]]}
    - {type: avgpool2d, kernel_size: 2}
    - {type: mish}
    - {type: leaky_relu, negative_slope: 0.2}
    - {type: flatten}
    - {type: dense, units: 4, activation: tanh}
"""


SHIPPED = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")
                 if "sweeps" not in p.parts)


@pytest.mark.parametrize("config", ["every layer kind", *SHIPPED])
def test_every_shipped_config_survives_export_and_import(tmp_path, config):
    if config == "every layer kind":
        (tmp_path / "kinds.yaml").write_text(EVERY_KIND)
    small = ["model.input_shape=[3, 64, 64]"] if config.startswith("torchvision") else []  # 224 x 224 is slow
    spec, _ = load_config(tmp_path / "kinds.yaml" if config == "every layer kind" else ROOT / "configs" / config, small)
    model, _ = build_model(spec.model, np.random.default_rng(0))
    for layer in model.named_layers():  # batchnorm statistics away from 0 and 1, so that they count
        for value in layer[1].buffers.values():
            value[...] = np.random.default_rng(1).uniform(0.5, 1.5, value.shape)
    c = spec.model.input_shape[0]
    norm = {"mean": [0.25] * c, "std": [0.5] * c}
    m = to_onnx(model, spec.model.input_shape, norm, spec.name)
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    _, _, imported, _, got_norm, _, _ = onnx_import.build(path, spec.name, None, None, None)
    assert got_norm == norm
    a, b = ([v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")] for m in (model, imported))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert_equal_to_onnxruntime(path, imported, spec.model.input_shape, norm)


# ---------------------------------------------------------------- what cannot be imported


def test_operators_cnnctl_cannot_take_are_named_with_a_node_and_a_count(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            y = torch.erf(self.b(torch.erf(self.a(x))))
            return nn.functional.local_response_norm(y, 2).mean((2, 3))

    path = export(Net(), (3, 16, 16), tmp_path / "m.onnx")
    expect_error(["import", path, "--out", tmp_path / "o"], "operators cnnctl cannot import",
                 "Erf (outside GELU's x * (1 + erf(x / sqrt 2)) / 2) x2, e.g. node", "x1, e.g. node")
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_graphs_that_are_not_image_classifiers_are_refused(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            y = self.c(x)
            return y.mean((2, 3)), y.amax((2, 3))

    torch.onnx.export(Two().eval(), torch.zeros(1, 1, 8, 8), str(tmp_path / "two.onnx"), dynamo=False,
                      input_names=["input"], output_names=["a", "b"])
    expect_error(["import", tmp_path / "two.onnx", "--out", tmp_path / "o"], "2 outputs (a, b)")
    torch.onnx.export(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval(),
                      torch.zeros(1, 1, 8, 8), str(tmp_path / "dyn.onnx"), dynamo=False, input_names=["input"],
                      output_names=["o"], dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}})
    expect_error(["import", tmp_path / "dyn.onnx", "--out", tmp_path / "o"], "height and width are not fixed",
                 "--input-size H,W")

    class BatchReshape(nn.Module):
        def forward(self, x):
            return x.reshape(2, -1)  # folds the batch into the features: depends on the batch

    path = export(nn.Sequential(nn.Conv2d(1, 2, 3), BatchReshape()), (1, 8, 8), tmp_path / "b.onnx")
    expect_error(["import", path, "--out", tmp_path / "o"], "only a flatten to (N, features)")


def test_ceil_mode_and_excluded_padding_pooling_and_asymmetric_padding_import(tmp_path):
    net = nn.Sequential(nn.MaxPool2d(3, 2, ceil_mode=True), nn.AvgPool2d(3, 2, 1, ceil_mode=True,
                                                                        count_include_pad=False),
                        nn.AvgPool2d(2, 1, 1, count_include_pad=True), nn.Flatten())
    path = export(net, (1, 8, 9), tmp_path / "c.onnx")
    _, _, model, _, _, _, imp = onnx_import.build(path, "c", None, None, None)
    assert imp.layers[0]["ceil_mode"] and imp.layers[1]["count_include_pad"] is False
    assert "count_include_pad" not in imp.layers[2]
    assert_equal_to_onnxruntime(path, model, (1, 8, 9))
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 1, 2, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["y"], pads=[0, 0, 1, 1], name="conv"),
         helper.make_node("Flatten", ["y"], ["output"], name="flat")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 128])], [weight])
    (tmp_path / "p.onnx").write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                      .SerializeToString())
    # asymmetric padding (TensorFlow's SAME with stride 2 writes it): [top, bottom, left, right] in cnnctl
    _, spec, model, _, _, _, imp = onnx_import.build(tmp_path / "p.onnx", "p", None, None, None)
    assert imp.layers[0]["padding"] == [0, 1, 0, 1]
    assert_equal_to_onnxruntime(tmp_path / "p.onnx", model, (1, 8, 8))


@pytest.mark.parametrize("content, words", [
    (b"not a protobuf at all \xff\xff", ["not an ONNX model"]),
    (None, ["ONNX file not found"]),
])
def test_files_that_are_not_onnx_are_one_message(tmp_path, content, words):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    expect_error(["import", path, "--out", tmp_path / "o"], *words)
    expect_error(["import", "/dev/zero", "--out", tmp_path / "o"], "not a regular file")


def _graph(tmp_path, nodes, inits, in_shape=(1, 8, 8), out_shape=None, opset=17, name="g.onnx"):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    path = tmp_path / name
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString())
    return path


def test_the_rarer_operators_of_item_two_import_exactly(tmp_path):
    """Pad joined into the convolution, ReduceMean over height and width, Dropout with its ratio, Identity,
    MatMul + Add as a dense layer and a final LogSoftmax, in one hand-written graph."""
    from onnx import helper

    g = np.random.default_rng(0)
    nodes = [
        helper.make_node("Pad", ["input", "pads"], ["p"], mode="constant", name="pad"),
        helper.make_node("Conv", ["p", "w", "b"], ["c"], kernel_shape=[3, 3], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ReduceMean", ["r"], ["m"], axes=[2, 3], keepdims=1, name="mean"),
        helper.make_node("Flatten", ["m"], ["f"], axis=1, name="flat"),
        helper.make_node("Dropout", ["f", "ratio"], ["d"], name="drop"),
        helper.make_node("Identity", ["d"], ["i"], name="same"),
        helper.make_node("MatMul", ["i", "wm"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "bm"], ["a"], name="bias"),
        helper.make_node("LogSoftmax", ["a"], ["output"], axis=1, name="logsoftmax"),
    ]
    inits = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "w": g.standard_normal((4, 1, 3, 3), np.float32),
             "b": g.standard_normal(4, np.float32), "ratio": np.array(0.3, np.float32),
             "wm": g.standard_normal((4, 3), np.float32), "bm": g.standard_normal(3, np.float32)}
    path = _graph(tmp_path, nodes, inits)
    _, spec, model, _, _, _, imp = onnx_import.build(path, "g", None, None, None)
    assert [s["type"] for s in imp.layers] == ["conv2d", "global_avgpool2d", "dropout", "dense", "log_softmax"]
    assert imp.layers[0]["padding"] == 1 and imp.layers[2]["rate"] == 0.3 and spec.loss.type == "nll"
    assert_equal_to_onnxruntime(path, model, (1, 8, 8))


@pytest.mark.parametrize("opset", [17, 18])
def test_mish_imports_as_opset_18s_node_or_written_out(tmp_path, opset):
    """Mish as one node (opset 18) or as x * tanh(softplus(x)) (before it), folded into the convolution; a
    Softplus anywhere else is named as such."""
    from onnx import helper

    g = np.random.default_rng(0)
    conv = helper.make_node("Conv", ["input", "w", "b"], ["c"], kernel_shape=[3, 3], name="conv")
    mish = ([helper.make_node("Mish", ["c"], ["m"], name="mish")] if opset == 18 else
            [helper.make_node("Softplus", ["c"], ["s"], name="softplus"),
             helper.make_node("Tanh", ["s"], ["t"], name="tanh"),
             helper.make_node("Mul", ["c", "t"], ["m"], name="mul")])
    nodes = [conv, *mish, helper.make_node("Flatten", ["m"], ["output"], axis=1, name="flat")]
    inits = {"w": g.standard_normal((4, 1, 3, 3), np.float32), "b": g.standard_normal(4, np.float32)}
    path = _graph(tmp_path, nodes, inits, opset=opset)
    _, _, model, _, _, _, imp = onnx_import.build(path, "g", None, None, None)
    assert imp.layers[0]["activation"] == "mish" and len(imp.layers) == 2
    assert_equal_to_onnxruntime(path, model, (1, 8, 8))
    lone = _graph(tmp_path, [helper.make_node("Softplus", ["input"], ["s"], name="lone"),
                             helper.make_node("Flatten", ["s"], ["output"], axis=1)], {}, name="lone.onnx")
    expect_error(["import", lone, "--out", tmp_path / "o"], "Softplus (outside Mish's x * tanh(softplus(x)))",
                 "'lone'")


@pytest.mark.parametrize("node, inits, words", [
    (("Clip", ["input", "lo", "hi"], {}), {"lo": np.float32(0), "hi": np.float32(1)}, "only Clip to [0, 6]"),
    (("Gelu", ["input"], {"approximate": "tanh"}), {}, "the tanh approximation is not imported"),
    (("HardSigmoid", ["input"], {"alpha": 0.2}), {}, "only PyTorch's (alpha 1/6"),
    (("Flatten", ["input"], {"axis": 2}), {}, "only axis 1"),
    (("LeakyRelu", ["input"], {}), {}, None),
], ids=["clip", "gelu-tanh", "hardsigmoid", "flatten-axis", "ok"])
def test_operator_attributes_cnnctl_cannot_take_are_named(tmp_path, node, inits, words):
    from onnx import helper

    op, inputs, attrs = node
    nodes = [helper.make_node(op, inputs, ["x"], name="the-node", **attrs),
             helper.make_node("Flatten", ["x"], ["output"], axis=1, name="flat")]
    path = _graph(tmp_path, nodes, inits, opset=20)
    if words is None:
        invoke("import", path, "--out", tmp_path / "o")
        return
    expect_error(["import", path, "--out", tmp_path / "o"], "'the-node'", words)


def test_a_graph_with_two_inputs_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["output"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 1, 4, 4]) for n in "ab"],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)])
    (tmp_path / "two.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    expect_error(["import", tmp_path / "two.onnx", "--out", tmp_path / "o"], "2 inputs (a, b)")


@pytest.mark.parametrize("name", [n for n in NETWORKS if "softmax" not in n])
def test_torch_networks_exported_with_a_batch_of_one_import_for_any_batch(tmp_path, name):
    """torch.onnx.export with a batch-1 dummy input and no dynamic axes fixes the batch at 1 in every shape and
    flatten: the import still takes any batch."""
    make, shape, keep_bn = NETWORKS[name]
    torch.manual_seed(0)
    net = make().eval()
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(net, torch.zeros(1, *shape), str(path), dynamo=False, input_names=["input"],
                      output_names=["output"], opset_version=17, do_constant_folding=not keep_bn)
    _, _, model, _, _, _, _ = onnx_import.build(path, name, None, None, None)
    x = np.random.default_rng(1).random((2, *shape), dtype=np.float32)
    session = ort.InferenceSession(str(path))
    ref = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(2)])
    got = model.forward(x, training=False)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_the_folder_import_wrote_is_a_model_for_predict_export_and_inspect(tmp_path):
    """`cnnctl predict imp_dir picture.png` (and export, inspect, explain, report) take the folder cnnctl import
    wrote, as they take a run directory: its model.safetensors."""
    pytest.importorskip("PIL")
    from PIL import Image

    from tests.test_onnx_import_hostile import conv_net, write

    nodes, inits = conv_net()
    invoke("import", write(tmp_path / "m.onnx", nodes, inits), "--out", tmp_path / "imp")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "p.png")
    by_folder = invoke("predict", tmp_path / "imp", tmp_path / "p.png", "--json").output
    by_file = invoke("predict", tmp_path / "imp" / "model.safetensors", tmp_path / "p.png", "--json").output
    assert json.loads(by_folder[by_folder.index("["):]) == json.loads(by_file[by_file.index("["):])
    invoke("export", tmp_path / "imp", "--out", tmp_path / "back.onnx")
    invoke("inspect", tmp_path / "imp" / "model.safetensors")
    invoke("explain", tmp_path / "imp", tmp_path / "p.png", "--out", tmp_path / "explained")
    assert list((tmp_path / "explained").glob("*.saliency.png"))
    pytest.importorskip("matplotlib")
    invoke("report", tmp_path / "imp", "--out", tmp_path / "imp.html")  # the model, and why nothing is evaluated
    page = (tmp_path / "imp.html").read_text()
    assert "<h2>Model</h2>" in page and "The data is not at hand" in page
