"""Name maps for `model.init_from.rename`: how the tensor names of another framework's state dict become cnnctl's,
one registry (RENAMES) as the only source of the shipped maps' names.

A map is a list of [regular expression, replacement] pairs, applied in order to every tensor name of the file
(re.sub, so a rule rewrites every match and may use groups: \\1). The shipped maps go with the shipped configs
of the same networks (configs/torchvision/): torchvision's state dicts, saved with
`safetensors.torch.save_file(model.state_dict(), "resnet18.safetensors")`, load into them as they are.
"""

from __future__ import annotations

import re

# torchvision's ResNets onto configs/torchvision/resnet{18,50}.yaml: the stem (layers.0-2), four stages
# (layers.3-6, each a sequential of residual units), the pooling (layers.7) and fc (layers.8)
_RESNET = [
    [r"^conv1\.", "layers.0."], [r"^bn1\.", "layers.1."],
    [r"^layer1\.", "layers.3."], [r"^layer2\.", "layers.4."], [r"^layer3\.", "layers.5."], [r"^layer4\.", "layers.6."],
    [r"\.conv1\.", ".body.0."], [r"\.bn1\.", ".body.1."], [r"\.conv2\.", ".body.2."], [r"\.bn2\.", ".body.3."],
    [r"\.conv3\.", ".body.4."], [r"\.bn3\.", ".body.5."], [r"\.downsample\.", ".shortcut."],
    [r"^fc\.", "layers.8."],
]

# torchvision's MobileNetV2 onto configs/torchvision/mobilenet_v2.yaml: features.0 (conv, batchnorm) is layers.0-1,
# features.N (an inverted residual block) is layers.N+1, a `residual` where its input is added back (its layers
# under body.), else a `sequential`; features.18 is layers.19-20, classifier.1 (after the dropout) layers.23
_ADDED_BACK = (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)
_IN = r"^(layers\.\d+\.(?:body\.)?)"  # a block's own layers, under body. where its input is added back
_MOBILENET_V2 = [
    [r"^features\.0\.0\.", "layers.0."], [r"^features\.0\.1\.", "layers.1."],
    [r"^features\.18\.0\.", "layers.19."], [r"^features\.18\.1\.", "layers.20."],
    *[[rf"^features\.{n}\.conv\.", f"layers.{n + 1}.{'body.' if n in _ADDED_BACK else ''}"] for n in range(2, 18)],
    # conv.0 (expand: conv, batchnorm), conv.1 (depthwise: conv, batchnorm), conv.2 (project), conv.3 (batchnorm)
    [_IN + r"2\.", r"\g<1>4."], [_IN + r"3\.", r"\g<1>5."],
    [_IN + r"0\.0\.", r"\g<1>0."], [_IN + r"0\.1\.", r"\g<1>1."],
    [_IN + r"1\.0\.", r"\g<1>2."], [_IN + r"1\.1\.", r"\g<1>3."],
    # features.1 has no expansion: conv.0 (depthwise: conv, batchnorm), conv.1 (project), conv.2 (batchnorm)
    [r"^features\.1\.conv\.0\.0\.", "layers.2.0."], [r"^features\.1\.conv\.0\.1\.", "layers.2.1."],
    [r"^features\.1\.conv\.1\.", "layers.2.2."], [r"^features\.1\.conv\.2\.", "layers.2.3."],
    [r"^classifier\.1\.", "layers.23."],
]

RENAMES: dict[str, list[list[str]]] = {
    "torchvision_resnet": _RESNET,
    "torchvision_mobilenet_v2": _MOBILENET_V2,
}


def compile_rules(rules: list[list[str]]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(pattern), replacement) for pattern, replacement in rules]


def renamed(name: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in rules:
        name = pattern.sub(replacement, name)
    return name
