"""Layer constructions and input shapes shared by the gradient and PyTorch tests.

CASES has an entry for every registered layer tag (a test asserts it), so a new layer cannot skip the checks.
Each case: (id, factory taking a Generator, input shape with batch axis).
"""


from cnnctl import nn

CASES = {
    "conv2d": [
        ("k3", lambda g: nn.Conv2D(2, 3, 3, rng=g), (2, 2, 7, 6)),
        ("k2x3_s2_p1_relu", lambda g: nn.Conv2D(2, 3, (2, 3), stride=2, padding=1, activation="relu", rng=g),
         (2, 2, 7, 8)),
        # stride 1 with a fused ReLU, once through each stride-1 input-gradient path ("rows": O > 1.5 C, then
        # "full"); the strided cases take "scatter"
        ("k3_p1_relu", lambda g: nn.Conv2D(2, 7, 3, padding=1, activation="relu", rng=g), (2, 2, 6, 7)),
        ("k3_p1_relu_narrow", lambda g: nn.Conv2D(4, 2, 3, padding=1, activation="relu", rng=g), (2, 4, 6, 7)),
        ("same_d2_tanh_nobias", lambda g: nn.Conv2D(3, 2, 3, padding="same", dilation=2, bias=False,
                                                    activation="tanh", rng=g), (2, 3, 6, 5)),
    ],
    "maxpool2d": [
        ("k2", lambda g: nn.MaxPool2D(2), (2, 3, 6, 8)),
        ("k3_s2_p1", lambda g: nn.MaxPool2D(3, stride=2, padding=1), (2, 2, 7, 6)),
        ("k2x3_s1", lambda g: nn.MaxPool2D((2, 3), stride=1), (2, 2, 5, 6)),
    ],
    "avgpool2d": [
        ("k2", lambda g: nn.AvgPool2D(2), (2, 3, 6, 8)),
        ("k3_s2_p1", lambda g: nn.AvgPool2D(3, stride=2, padding=1), (2, 2, 7, 6)),
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
    "sigmoid": [("sigmoid", lambda g: nn.Sigmoid(), (3, 4, 5))],
    "tanh": [("tanh", lambda g: nn.Tanh(), (3, 4, 5))],
    "softmax": [("softmax", lambda g: nn.Softmax(), (4, 6))],
    "dropout": [("dropout", lambda g: nn.Dropout(0.3, rng=g), (4, 10))],
    "batchnorm1d": [("bn1d", lambda g: nn.BatchNorm1D(5), (6, 5))],
    "batchnorm2d": [("bn2d", lambda g: nn.BatchNorm2D(3), (4, 3, 5, 4))],
}


def all_cases():
    for tag, cases in CASES.items():
        for case_id, factory, shape in cases:
            yield tag, case_id, factory, shape


def randomize_params(layer, rng):
    """Non-trivial parameters (BatchNorm starts at ones/zeros, biases at zeros)."""
    for key, p in layer.params.items():
        layer.params[key] = (p + rng.normal(0, 0.5, p.shape)).astype(p.dtype)
