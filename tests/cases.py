"""Layer constructions and input shapes shared by the gradient and PyTorch tests.

CASES has an entry for every registered layer tag (a test asserts it), so a new layer cannot skip the checks.
Each case: (id, factory taking a Generator, input shape with batch axis).
"""

from cnnctl.core import nn


def _seq(*layers):
    return nn.Sequential(list(layers))


def basic_block(g, c, o, stride):
    """ResNet's basic block: conv-bn-relu-conv-bn plus the identity or a projection, then ReLU."""
    body = _seq(nn.Conv2D(c, o, 3, stride=stride, padding=1, bias=False, rng=g), nn.BatchNorm2D(o, activation="relu"),
                nn.Conv2D(o, o, 3, padding=1, bias=False, rng=g), nn.BatchNorm2D(o))
    shortcut = None if (c, stride) == (o, 1) else _seq(nn.Conv2D(c, o, 1, stride=stride, bias=False, rng=g),
                                                      nn.BatchNorm2D(o))
    return nn.Residual(body, shortcut, "relu")


def bottleneck(g, c, mid, o):
    """ResNet-50's bottleneck: 1x1 down, 3x3, 1x1 up, projection shortcut."""
    body = _seq(nn.Conv2D(c, mid, 1, bias=False, rng=g), nn.BatchNorm2D(mid, activation="relu"),
                nn.Conv2D(mid, mid, 3, padding=1, bias=False, rng=g), nn.BatchNorm2D(mid, activation="relu"),
                nn.Conv2D(mid, o, 1, bias=False, rng=g), nn.BatchNorm2D(o))
    return nn.Residual(body, _seq(nn.Conv2D(c, o, 1, bias=False, rng=g), nn.BatchNorm2D(o)), "relu")


def inverted_residual(g, c, expand):
    """MobileNetV2's inverted residual: 1x1 expand, 3x3 depthwise (groups = channels), 1x1 linear projection."""
    e = c * expand
    return nn.Residual(_seq(nn.Conv2D(c, e, 1, bias=False, rng=g), nn.BatchNorm2D(e, activation="relu"),
                            nn.Conv2D(e, e, 3, padding=1, groups=e, bias=False, rng=g),
                            nn.BatchNorm2D(e, activation="relu"),
                            nn.Conv2D(e, c, 1, bias=False, rng=g), nn.BatchNorm2D(c)))


def dense_layer(g, c, growth):
    """DenseNet's layer: the input and bn-relu-conv(growth) of it, concatenated."""
    return nn.Concat([_seq(), _seq(nn.BatchNorm2D(c, activation="relu"),
                                   nn.Conv2D(c, growth, 3, padding=1, bias=False, rng=g))])


CASES = {
    "conv2d": [
        ("k3", lambda g: nn.Conv2D(2, 3, 3, rng=g), (2, 2, 7, 6)),
        ("k3_s2_pads_0101", lambda g: nn.Conv2D(2, 3, 3, stride=2, padding=(0, 1, 0, 1), rng=g), (2, 2, 7, 6)),
        ("k3_pads_2011", lambda g: nn.Conv2D(2, 4, 3, padding=(2, 0, 1, 1), activation="relu", rng=g), (2, 2, 6, 5)),
        ("k2x3_s2_p1_relu", lambda g: nn.Conv2D(2, 3, (2, 3), stride=2, padding=1, activation="relu", rng=g),
         (2, 2, 7, 8)),
        # stride 1 with a fused ReLU, once through each stride-1 input-gradient path ("rows": O > 1.5 C, then
        # "full"); the strided cases take "scatter"
        ("k3_p1_relu", lambda g: nn.Conv2D(2, 7, 3, padding=1, activation="relu", rng=g), (2, 2, 6, 7)),
        ("k3_p1_relu_narrow", lambda g: nn.Conv2D(4, 2, 3, padding=1, activation="relu", rng=g), (2, 4, 6, 7)),
        ("same_d2_tanh_nobias", lambda g: nn.Conv2D(3, 2, 3, padding="same", dilation=2, bias=False,
                                                    activation="tanh", rng=g), (2, 3, 6, 5)),
        ("groups4", lambda g: nn.Conv2D(8, 12, 3, padding=1, groups=4, rng=g), (2, 8, 5, 6)),
        ("depthwise_s2_relu", lambda g: nn.Conv2D(4, 4, 3, stride=2, padding=1, groups=4, activation="relu", rng=g),
         (2, 4, 7, 6)),
        ("depthwise_x2_d2", lambda g: nn.Conv2D(3, 6, (3, 2), dilation=(2, 1), groups=3, rng=g), (2, 3, 8, 5)),
    ],
    "sequential": [
        ("conv_relu_pool", lambda g: _seq(nn.Conv2D(2, 3, 3, padding=1, activation="relu", rng=g), nn.MaxPool2D(2)),
         (2, 2, 6, 6)),
    ],
    "residual": [
        ("basic_identity", lambda g: basic_block(g, 3, 3, 1), (2, 3, 6, 5)),
        ("basic_projection", lambda g: basic_block(g, 2, 4, 2), (2, 2, 7, 6)),
        ("bottleneck", lambda g: bottleneck(g, 4, 2, 8), (2, 4, 5, 5)),
        ("inverted_residual", lambda g: inverted_residual(g, 3, 2), (2, 3, 5, 6)),
    ],
    "concat": [
        ("dense_layer", lambda g: dense_layer(g, 3, 2), (2, 3, 5, 5)),
        ("inception", lambda g: nn.Concat([_seq(nn.Conv2D(2, 2, 1, rng=g)),
                                           _seq(nn.Conv2D(2, 3, 3, padding=1, activation="relu", rng=g)),
                                           _seq(nn.MaxPool2D(3, stride=1, padding=1))]), (2, 2, 5, 6)),
        ("features", lambda g: nn.Concat([_seq(nn.Dense(4, 3, rng=g)), _seq()]), (3, 4)),
    ],
    "gate": [
        ("squeeze_excite", lambda g: nn.Gate(_seq(nn.GlobalAvgPool2D(), nn.Dense(4, 2, activation="relu", rng=g),
                                                  nn.Dense(2, 4, activation="hardsigmoid", rng=g))), (2, 4, 5, 6)),
        ("sigmoid_gate", lambda g: nn.Gate(_seq(nn.GlobalAvgPool2D(), nn.Dense(3, 3, activation="sigmoid", rng=g))),
         (3, 3, 4, 4)),
    ],
    "maxpool2d": [
        ("k2", lambda g: nn.MaxPool2D(2), (2, 3, 6, 8)),
        ("k3_s2_p1", lambda g: nn.MaxPool2D(3, stride=2, padding=1), (2, 2, 7, 6)),
        ("k2x3_s1", lambda g: nn.MaxPool2D((2, 3), stride=1), (2, 2, 5, 6)),
        ("k3_s2_ceil", lambda g: nn.MaxPool2D(3, stride=2, ceil_mode=True), (2, 2, 8, 6)),
        ("k3_s2_p1_ceil", lambda g: nn.MaxPool2D(3, stride=2, padding=1, ceil_mode=True), (2, 2, 6, 7)),
    ],
    "avgpool2d": [
        ("k2", lambda g: nn.AvgPool2D(2), (2, 3, 6, 8)),
        ("k3_s2_p1", lambda g: nn.AvgPool2D(3, stride=2, padding=1), (2, 2, 7, 6)),
        ("k3_s2_p1_exclude_pad", lambda g: nn.AvgPool2D(3, stride=2, padding=1, count_include_pad=False),
         (2, 2, 7, 6)),
        ("k3_s2_ceil", lambda g: nn.AvgPool2D(3, stride=2, ceil_mode=True), (2, 2, 8, 6)),
        ("k3_s2_p1_ceil_exclude_pad", lambda g: nn.AvgPool2D(3, stride=2, padding=1, ceil_mode=True,
                                                             count_include_pad=False), (2, 2, 6, 8)),
    ],
    "global_avgpool2d": [("gap", lambda g: nn.GlobalAvgPool2D(), (3, 4, 5, 3))],
    "flatten": [("flatten", lambda g: nn.Flatten(), (2, 3, 4, 5))],
    "dense": [
        ("dense", lambda g: nn.Dense(7, 5, rng=g), (4, 7)),
        ("dense_sigmoid_nobias", lambda g: nn.Dense(6, 3, bias=False, activation="sigmoid", rng=g), (4, 6)),
    ],
    "relu": [("relu", lambda g: nn.ReLU(), (3, 4, 5))],
    "leaky_relu": [("leaky", lambda g: nn.LeakyReLU(0.1), (3, 4, 5))],
    "elu": [("elu", lambda g: nn.ELU(0.7), (3, 4, 5))],
    "gelu": [("gelu", lambda g: nn.GELU(), (3, 4, 5)), ("gelu_wide", lambda g: nn.GELU(), (2, 3, 4, 5))],
    "celu": [("celu", lambda g: nn.CELU(0.6), (3, 4, 5)), ("celu_wide", lambda g: nn.CELU(2.5), (2, 3, 4, 5))],
    "sigmoid": [("sigmoid", lambda g: nn.Sigmoid(), (3, 4, 5))],
    "relu6": [("relu6", lambda g: nn.ReLU6(), (3, 4, 5))],
    "hardsigmoid": [("hardsigmoid", lambda g: nn.HardSigmoid(), (3, 4, 5))],
    "hardswish": [("hardswish", lambda g: nn.HardSwish(), (3, 4, 5)),
                  ("hardswish_wide", lambda g: nn.HardSwish(), (2, 3, 4, 5))],
    "silu": [("silu", lambda g: nn.SiLU(), (3, 4, 5)), ("silu_wide", lambda g: nn.SiLU(), (2, 3, 4, 5))],
    "mish": [("mish", lambda g: nn.Mish(), (3, 4, 5)), ("mish_wide", lambda g: nn.Mish(), (2, 3, 4, 5))],
    "scale": [("scale_maps", lambda g: nn.Scale(3), (2, 3, 4, 5)),
              ("scale_flat_nobias", lambda g: nn.Scale(4, bias=False), (3, 4))],
    "layernorm2d": [("layernorm2d", lambda g: nn.LayerNorm2D(5, 1e-6), (2, 5, 3, 4)),
                    ("layernorm2d_eps", lambda g: nn.LayerNorm2D(3, 1e-2), (2, 3, 2, 2)),
                    ("layernorm2d_flat", lambda g: nn.LayerNorm2D(6, 1e-6), (3, 6))],
    "split": [("split_half0", lambda g: nn.Split(2, 0), (2, 6, 3, 4)),
              ("split_third2", lambda g: nn.Split(3, 2), (2, 6, 2, 3)),
              ("split_flat1", lambda g: nn.Split(2, 1), (3, 4))],
    "channel_shuffle": [("shuffle3", lambda g: nn.ChannelShuffle(3), (2, 6, 3, 4)),
                        ("shuffle2_of_8", lambda g: nn.ChannelShuffle(2), (2, 8, 2, 3))],
    # odd sizes only: torch's window for an even size reaches the other way (ONNX's is tested against onnxruntime)
    "lrn": [("lrn5", lambda g: nn.LRN(5, 0.5, 0.75, 2.0), (2, 7, 3, 4)),
            ("lrn3_wider_than_channels", lambda g: nn.LRN(3, 1.0, 0.5, 1.0), (2, 2, 3, 3)),
            ("lrn_alexnet", lambda g: nn.LRN(5, 1e-4, 0.75, 1.0), (2, 6, 3, 3))],
    "tanh": [("tanh", lambda g: nn.Tanh(), (3, 4, 5))],
    "softmax": [("softmax", lambda g: nn.Softmax(), (4, 6))],
    "log_softmax": [("log_softmax", lambda g: nn.LogSoftmax(), (4, 6))],
    "dropout": [("dropout", lambda g: nn.Dropout(0.3, rng=g), (4, 10))],
    "dropout2d": [("dropout2d", lambda g: nn.Dropout2D(0.4, rng=g), (3, 5, 4, 3))],
    "batchnorm1d": [("bn1d", lambda g: nn.BatchNorm1D(5), (6, 5)),
                    ("bn1d_ghost", lambda g: nn.BatchNorm1D(4, ghost_batch=3), (8, 4))],
    "batchnorm2d": [("bn2d", lambda g: nn.BatchNorm2D(3), (4, 3, 5, 4)),
                    ("bn2d_ghost", lambda g: nn.BatchNorm2D(3, ghost_batch=2, activation="relu"), (5, 3, 4, 4))],
}


def all_cases():
    for tag, cases in CASES.items():
        for case_id, factory, shape in cases:
            yield tag, case_id, factory, shape


def randomize_params(layer, rng, statistics=False):
    """Non-trivial parameters (BatchNorm starts at ones/zeros, biases at zeros) everywhere in the tree, and with
    `statistics` non-trivial BatchNorm running statistics too."""
    for p in layer.parameters():
        p.layer.params[p.key] = (p.value + rng.normal(0, 0.5, p.value.shape)).astype(p.value.dtype)
    if statistics:
        for _, sub in layer.named_layers():
            if "running_mean" in sub.buffers:
                dtype = sub.buffers["running_mean"].dtype
                sub.buffers["running_mean"] = rng.normal(size=sub.num_features).astype(dtype)
                sub.buffers["running_var"] = rng.uniform(0.5, 2.0, size=sub.num_features).astype(dtype)
