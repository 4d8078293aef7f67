"""Our layer trees as equivalent torch modules with the same state-dict names (a test-only reference)."""

import torch

from cnnctl.core import nn

tnn, tf = torch.nn, torch.nn.functional


def _act(layer):
    """The activation a conv, dense, batchnorm or residual applies itself, as a torch callable."""
    return (lambda t: t) if layer.activation is None else to_torch(layer.activation)


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
            g = layer.ghost_batch
            if self.training and g and len(x) > g:  # ghost batchnorm: the module on each virtual batch in turn
                return act(torch.cat([super(BN, self).forward(part) for part in torch.split(x, g)]))
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


class Gate(tnn.Module):
    def __init__(self, layer):
        super().__init__()
        self.branch = to_torch(layer.branch)

    def forward(self, x):
        return x * self.branch(x)[:, :, None, None]


class Root(tnn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layers = tnn.Sequential(*[to_torch(child) for child in layer.layers])

    def forward(self, x):
        return self.layers(x)


# the torch reference of every registered layer type, by its tag (a test asserts every tag has one)
class TorchLayerNorm2d(tnn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: LayerNorm(C) over channels-last maps, permuted there and back."""

    def forward(self, x):
        if x.dim() == 2:  # pooled (N, C) features: the channels are the last axis
            return super().forward(x)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TorchScale(tnn.Module):
    """cnnctl's scale layer in torch: a per-channel weight and bias."""

    def __init__(self, channels, bias):
        super().__init__()
        self.weight = tnn.Parameter(torch.ones(channels))
        self.bias = tnn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = x * self.weight.view(shape)
        return y + self.bias.view(shape) if self.bias is not None else y


class TorchSplit(tnn.Module):
    """cnnctl's split layer in torch: part `take` of x.chunk(parts, dim=1)."""

    def __init__(self, parts, take):
        super().__init__()
        self.parts, self.take = parts, take

    def forward(self, x):
        return x.chunk(self.parts, dim=1)[self.take]


TORCH = {
    "sequential": lambda layer: tnn.Sequential(*[to_torch(child) for child in layer.layers]),
    "residual": Residual,
    "concat": Concat,
    "gate": Gate,
    "conv2d": Conv,
    "dense": Linear,
    "batchnorm1d": _bn,
    "batchnorm2d": _bn,
    "global_avgpool2d": lambda layer: tnn.Sequential(tnn.AdaptiveAvgPool2d(1), tnn.Flatten()),
    "maxpool2d": lambda layer: tnn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding, ceil_mode=layer.ceil_mode),
    "avgpool2d": lambda layer: tnn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, ceil_mode=layer.ceil_mode,
                                             count_include_pad=layer.count_include_pad),
    "flatten": lambda layer: tnn.Flatten(),
    "relu": lambda layer: tnn.ReLU(),
    "leaky_relu": lambda layer: tnn.LeakyReLU(layer.negative_slope),
    "elu": lambda layer: tnn.ELU(layer.alpha),
    "celu": lambda layer: tnn.CELU(layer.alpha),
    "gelu": lambda layer: tnn.GELU(),
    "sigmoid": lambda layer: tnn.Sigmoid(),
    "relu6": lambda layer: tnn.ReLU6(),
    "hardsigmoid": lambda layer: tnn.Hardsigmoid(),
    "hardswish": lambda layer: tnn.Hardswish(),
    "silu": lambda layer: tnn.SiLU(),
    "mish": lambda layer: tnn.Mish(),
    "layernorm2d": lambda layer: TorchLayerNorm2d(layer.channels, layer.eps),
    "scale": lambda layer: TorchScale(layer.channels, "bias" in layer.params),
    "channel_shuffle": lambda layer: tnn.ChannelShuffle(layer.groups),
    "split": lambda layer: TorchSplit(layer.splits, layer.take),
    "lrn": lambda layer: tnn.LocalResponseNorm(layer.size, layer.alpha, layer.beta, layer.k),
    "tanh": lambda layer: tnn.Tanh(),
    "softmax": lambda layer: tnn.Softmax(dim=1),
    "log_softmax": lambda layer: tnn.LogSoftmax(dim=1),
    "dropout": lambda layer: tnn.Dropout(layer.rate),
    "dropout2d": lambda layer: tnn.Dropout2d(layer.rate),
}


def to_torch(layer):
    """The torch module computing what `layer` computes, with parameter and buffer names equal to ours."""
    if isinstance(layer, nn.Model):
        return Root(layer)
    return TORCH[layer.tag](layer)


def loaded(layer):
    """to_torch(layer) with our parameters and buffers loaded by name (strict: the names must match)."""
    module = to_torch(layer)
    module.load_state_dict({k: torch.tensor(v) for k, v in layer.state_dict().items()}, strict=True)
    return module
