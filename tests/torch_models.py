"""Our layer trees as equivalent torch modules with the same state-dict names (a test-only reference)."""

import torch

from cnnctl import nn

tnn, tf = torch.nn, torch.nn.functional
ACTS = {None: lambda t: t, "relu": tf.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
        "softmax": lambda t: tf.softmax(t, 1), "leaky_relu": tf.leaky_relu, "elu": tf.elu}


def _act(layer):
    a = layer.activation
    if a is None:
        return ACTS[None]
    if isinstance(a, nn.LeakyReLU):
        return lambda t: tf.leaky_relu(t, a.negative_slope)
    if isinstance(a, nn.ELU):
        return lambda t: tf.elu(t, a.alpha)
    return ACTS[a.tag]


class Conv(tnn.Conv2d):
    """torch's Conv2d after our padding (which may be asymmetric: 'same'), then our activation."""

    def __init__(self, layer):
        super().__init__(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, 0, layer.dilation,
                         groups=layer.groups, bias="bias" in layer.params)
        self.pads, self.act = layer.pads, _act(layer)

    def forward(self, x):
        t, b, l, r = self.pads(tuple(x.shape[2:]))
        return self.act(super().forward(tf.pad(x, (l, r, t, b))))


class Linear(tnn.Linear):
    def __init__(self, layer):
        super().__init__(layer.in_features, layer.out_features, bias="bias" in layer.params)
        self.act = _act(layer)

    def forward(self, x):
        return self.act(super().forward(x))


def _bn(layer):
    base = tnn.BatchNorm1d if isinstance(layer, nn.BatchNorm1D) else tnn.BatchNorm2d

    class BN(base):
        def forward(self, x):
            return act(super().forward(x))

    act = _act(layer)
    return BN(layer.num_features, eps=layer.eps, momentum=layer.momentum)


class Residual(tnn.Module):
    def __init__(self, layer):
        super().__init__()
        self.body = to_torch(layer.body)
        if layer.shortcut is not None:
            self.shortcut = to_torch(layer.shortcut)
        self.act = _act(layer)

    def forward(self, x):
        return self.act(self.body(x) + (self.shortcut(x) if hasattr(self, "shortcut") else x))


class Concat(tnn.Module):
    def __init__(self, layer):
        super().__init__()
        self.branches = tnn.ModuleList([to_torch(b) for b in layer.branches])

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


class Root(tnn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layers = tnn.Sequential(*[to_torch(child) for child in layer.layers])

    def forward(self, x):
        return self.layers(x)


def to_torch(layer):
    """The torch module computing what `layer` computes, with parameter and buffer names equal to ours."""
    if isinstance(layer, nn.Model):
        return Root(layer)
    if isinstance(layer, nn.Sequential):
        return tnn.Sequential(*[to_torch(child) for child in layer.layers])
    if isinstance(layer, nn.Residual):
        return Residual(layer)
    if isinstance(layer, nn.Concat):
        return Concat(layer)
    if isinstance(layer, nn.Conv2D):
        return Conv(layer)
    if isinstance(layer, nn.Dense):
        return Linear(layer)
    if isinstance(layer, (nn.BatchNorm1D, nn.BatchNorm2D)):
        return _bn(layer)
    if isinstance(layer, nn.GlobalAvgPool2D):
        return tnn.Sequential(tnn.AdaptiveAvgPool2d(1), tnn.Flatten())
    return {
        nn.MaxPool2D: lambda: tnn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding),
        nn.AvgPool2D: lambda: tnn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding),
        nn.Flatten: tnn.Flatten,
        nn.ReLU: tnn.ReLU,
        nn.LeakyReLU: lambda: tnn.LeakyReLU(getattr(layer, "negative_slope", 0.01)),
        nn.ELU: lambda: tnn.ELU(getattr(layer, "alpha", 1.0)),
        nn.Sigmoid: tnn.Sigmoid,
        nn.Tanh: tnn.Tanh,
        nn.Softmax: lambda: tnn.Softmax(dim=1),
        nn.Dropout: lambda: tnn.Dropout(layer.rate),
    }[type(layer)]()


def loaded(layer):
    """to_torch(layer) with our parameters and buffers loaded by name (strict: the names must match)."""
    module = to_torch(layer)
    module.load_state_dict({k: torch.tensor(v) for k, v in layer.state_dict().items()}, strict=True)
    return module
