"""Spec -> layers: propagate input_shape through the layer specs, building each layer for the shape it gets.

Shape problems surface here, before any data is touched, naming the nested layer
(`model.layers[3] (basic) > body[2] (conv2d)`), its input shape and a fix. Every layer gets a row: its
state-dict path, output shape, parameters, MACs and receptive field, with its children's rows below it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from cnnctl.core.memory import refuse_over
from cnnctl.core.nn import ACTIVATIONS, LOSSES, Layer, Loss, Model, Sequential
from cnnctl.core.nn.init import SHAPES_ONLY
from cnnctl.core.param_groups import assign_groups
from cnnctl.errors import CheckpointError, ConfigError, ShapeError

from .spec import ModelSpec, Spec


@dataclass
class LayerRow:
    index: int  # position in its parent's list
    path: str  # state-dict prefix: layers.3.body.0
    label: str  # for messages: model.layers[3] (basic) > body[0] (conv2d)
    name: str
    type: str  # the spec's type, or the block's name
    depth: int  # 0 for model.layers
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int  # parameter values, children included (trainable or frozen)
    buffers: int  # non-trainable values (running statistics), children included
    macs: int
    receptive_field: tuple[int, int, int, int] | None  # (height, width, row stride, column stride); None: all
    children: list[LayerRow] = field(default_factory=list)
    named: bool = False  # the name was given in the config (else it is the default type_index)
    frozen: int = 0  # of params, those in frozen layers (trainable: false)

    def walk(self) -> Iterator[LayerRow]:
        yield self
        for c in self.children:
            yield from c.walk()

    def as_dict(self) -> dict:
        rf = self.receptive_field
        return {"index": self.index, "path": self.path, "name": self.name, "type": self.type,
                "output_shape": list(self.output_shape), "params": self.params, "buffers": self.buffers,
                "frozen_params": self.frozen, "macs": self.macs,
                "receptive_field": None if rf is None else {"size": [rf[0], rf[1]], "stride": [rf[2], rf[3]]},
                "children": [c.as_dict() for c in self.children]}


def walk(rows: list[LayerRow]) -> Iterator[LayerRow]:
    """Every row of a tree, depth first."""
    for r in rows:
        yield from r.walk()


class Scope:
    """Where a layer is being built: its path, its label for errors, the generator for weights, and the
    receptive field of its input. Container specs call `sequence` to build their layer lists."""

    def __init__(self, rng: np.random.Generator, path: str, label: str, depth: int, rf, rows: list[LayerRow]):
        self.rng, self.path, self.label, self.depth, self.rf, self.rows = rng, path, label, depth, rf, rows

    def sequence(self, field: str | None, specs: list, input_shape) -> Sequential:
        """A Sequential of these specs, built in order from input_shape; `field` names it in the state dict
        and in error paths (body, shortcut, branches.0; None for the container's own list)."""
        path = ".".join(p for p in (self.path, field) if p)
        label_field = "" if field is None else field.replace(".", "[", 1) + ("]" if "." in field else "")
        layers = self.build_list(specs, tuple(input_shape), path, label_field)
        return Sequential(layers)

    def build_list(self, specs: list, shape: tuple, path: str, label_field: str) -> list[Layer]:
        layers, rf = [], self.rf
        for i, spec in enumerate(specs):
            child_path = f"{path}.{i}" if path else str(i)
            sep = " > " if self.depth >= 0 else "."
            named = f" {spec.name!r}" if spec.name else ""
            label = f"{self.label}{sep}{label_field}[{i}] ({spec.display_type}{named})"
            rows: list[LayerRow] = []
            scope = Scope(self.rng, child_path, label, self.depth + 1, rf, rows)
            try:
                layer = spec.build(shape, scope)
                if not spec.trainable:
                    layer.freeze()
                out, macs = tuple(layer.output_shape(shape)), int(layer.macs(shape))
            except ShapeError as e:
                if getattr(e, "located", False):
                    raise
                located = ShapeError(f"{label}: input shape {shape}: {e.message}", e.hint)
                located.located = True
                raise located from None
            rf = layer.receptive_field(rf)
            self.rows.append(LayerRow(i, child_path, label, spec.name or f"{spec.display_type}_{i}",
                                      spec.display_type, self.depth + 1, shape, out, layer.num_params(),
                                      layer.num_buffer_values(), macs, rf, rows, spec.name is not None,
                                      layer.num_frozen_params()))
            layers.append(layer)
            shape = out
        return layers


def build_model(spec: ModelSpec, rng: np.random.Generator | None = None, weights: dict | None = None,
                source="") -> tuple[Model, list[LayerRow]]:
    """The Model for a model spec, and one row per top-level layer (each with its children's rows); with `weights`
    (a state dict read from the file `source`) holding those weights."""
    rng = rng if rng is not None else np.random.default_rng(0)
    rows: list[LayerRow] = []
    root = Scope(rng, "", "model", -1, (1, 1, 1, 1), rows)
    layers = root.build_list(spec.tree(), tuple(spec.input_shape), "layers", "layers")
    model = Model(layers, [r.name for r in rows])
    if weights is not None:
        load_weights(model, weights, source)
    return model, rows


def load_weights(model: Model, state: dict[str, np.ndarray], source) -> None:
    """A state dict read from the file `source` into a model: every tensor by name and shape, else one error."""
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: weights do not fit the architecture in its config: {e}",
                              "the file was edited or belongs to another model") from None


def describe(spec: ModelSpec) -> list[LayerRow]:
    """The rows of a model spec (shapes, parameter counts, MACs) without drawing its weights: memory stays small
    whatever the sizes, so inspect shows and estimates what training would refuse."""
    return build_model(spec, SHAPES_ONLY)[1]


def activation_values(rows: list[LayerRow]) -> int:
    """Numbers the layers output for one sample (the leaves of the tree; containers add none of their own)."""
    return sum(math.prod(r.output_shape) for r in walk(rows) if not r.children)


def training_bytes(rows: list[LayerRow], batch_size: int, averaged: bool = False) -> int:
    """An estimate of the memory a training step needs: weights, gradients and two optimizer moments per
    parameter (and their moving average with train.ema_decay), and per sample of the batch four copies of every
    activation (the output, its gradient and what backward keeps: lowered inputs, masks). Close to the measured
    peak (ResNet-20 at batch 128: estimate 0.83 GB, peak RSS 0.84 GB including Python and NumPy)."""
    params = sum(r.params + r.buffers for r in rows)
    return 4 * ((5 if averaged else 4) * params + 4 * batch_size * activation_values(rows))


def check_training_memory(name: str, rows: list[LayerRow], batch_size: int, averaged: bool = False) -> None:
    """Refuse, before any weight is drawn, a model and batch size this machine's memory cannot train."""
    refuse_over(f"training {name} at batch size {batch_size}", training_bytes(rows, batch_size, averaged), 1,
                ShapeError,
                "lower data.batch_size, or use fewer filters or units (cnnctl inspect shows where the parameters "
                "and activations are)")


def check_evaluation_memory(name: str, rows: list[LayerRow], batch_size: int) -> None:
    """Refuse, before the first batch, an evaluation batch (data.eval_batch_size, or the split when it is
    smaller) this process's memory cannot run: the weights and per sample twice every activation (a layer's
    input and output, or the lowered input of a convolution)."""
    params = sum(r.params + r.buffers for r in rows)
    needed = 4 * (params + 2 * batch_size * activation_values(rows))
    refuse_over(f"evaluating {name} at batch size {batch_size}", needed, 1, ShapeError,
                "lower data.eval_batch_size (validation, test, eval and predict batches)")


def check_outputs(spec: Spec, rows: list[LayerRow], num_classes: int) -> None:
    """The last layer must emit one value per class."""
    last = rows[-1]
    if last.output_shape != (num_classes,):
        raise ShapeError(
            f"{last.label} outputs shape {last.output_shape}, but the dataset "
            f"'{spec.data.dataset}' has {num_classes} classes",
            f"end the model with {{type: dense, units: {num_classes}}}",
        )


def final_activation(specs: list) -> str | None:
    """The element-wise function the model's outputs leave last: an activation layer's type, or the
    `activation:` of the last layer (looking into a trailing sequential); None for a linear output."""
    last = specs[-1]
    while last.type == "sequential":
        last = last.layers[-1]
    return last.type if last.type in ACTIVATIONS else getattr(last, "activation", None)


def check_loss_fits(spec: Spec) -> None:
    """The model's outputs must be what the loss takes: cross_entropy takes logits (a softmax before it trains
    on probabilities and learns worse, with no error), nll takes log-probabilities (a log_softmax ends the
    model)."""
    takes, loss = LOSSES[spec.loss.type].takes, spec.loss.type
    tree = spec.model.tree()
    final = final_activation(tree)
    where = f"model.layers[{len(tree) - 1}] ({tree[-1].type})"
    if takes == "logits" and final in ("softmax", "log_softmax"):
        own = tree[-1].type == final  # a layer of its own, or the last layer's activation: key
        key = where if own else f"model.layers[{len(tree) - 1}].activation: {final}"
        raise ConfigError(f"the model ends in {final} ({key}), but loss {loss} takes logits and applies "
                          "log-softmax itself: it would train on probabilities, slower and to a worse accuracy",
                          (f"remove the layer {where}" if own else f"remove activation: {final} from "
                           f"model.layers[{len(tree) - 1}]") + " (predict and export --softmax still give "
                          "probabilities), or end with log_softmax and use loss: nll")
    if takes == "label_logits" and final in ("sigmoid", "softmax", "log_softmax"):
        raise ConfigError(f"the model ends in {final} ({where}), but loss {loss} takes logits and applies a sigmoid "
                          "to each itself", f"remove {final} from the end of the model (predict still gives each "
                          "label's probability)")
    if takes == "log_probabilities" and final != "log_softmax":
        raise ConfigError(f"loss {loss} takes log-probabilities, but the model ends in "
                          f"{final or 'a linear layer'} ({where})",
                          "end the model with {type: log_softmax} (or activation: log_softmax on its last layer), "
                          "or use loss: cross_entropy on the logits")


def class_weights(spec: Spec, train_labels: np.ndarray | None, num_classes: int | None) -> np.ndarray | None:
    """loss.class_weights as an array: the list given, or for auto n / (classes * count) over the training
    labels (a class without images gets weight 1); None without weights, or for auto without labels (bench)."""
    w = spec.loss.class_weights
    if w is None or (w == "auto" and train_labels is None):
        return None
    if w == "auto":
        counts = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
        return np.where(counts > 0, len(train_labels) / (num_classes * np.maximum(counts, 1)), 1.0)
    if num_classes is not None and len(w) != num_classes:
        raise ConfigError(f"loss.class_weights has {len(w)} values but the dataset has {num_classes} classes",
                          f"give {num_classes} weights, or class_weights: auto")
    return np.asarray(w, np.float64)


def evaluation_loss(spec: Spec, rows: list[LayerRow], train_labels: np.ndarray, classes: int, batch: int) -> Loss:
    """What evaluating a model of spec on its data needs from the spec, checked: one output per class, an
    evaluation batch that fits in memory, and the loss (class weights from the training labels)."""
    check_outputs(spec, rows, classes)
    check_evaluation_memory(spec.name, rows, batch)
    return build_loss(spec, train_labels, classes)


def build_loss(spec: Spec, train_labels: np.ndarray | None = None, num_classes: int | None = None) -> Loss:
    """The config's loss; class weights (auto) come from the training labels when given."""
    if spec.loss.type == "cross_entropy":
        return LOSSES["cross_entropy"](label_smoothing=spec.loss.label_smoothing,
                                       class_weights=class_weights(spec, train_labels, num_classes))
    if spec.loss.type == "bce_with_logits":
        return LOSSES["bce_with_logits"](pos_weight=pos_weight(spec, train_labels, num_classes))
    return LOSSES[spec.loss.type]()


def pos_weight(spec: Spec, train_labels: np.ndarray | None, num_labels: int | None) -> np.ndarray | None:
    """loss.pos_weight as an array: the list given, or for auto each label's negatives / positives in the
    training labels (N, labels) (1 for a label no image has); None without, or for auto without labels."""
    w = spec.loss.pos_weight
    if w is None or (w == "auto" and train_labels is None):
        return None
    if w == "auto":
        positives = train_labels.sum(axis=0, dtype=np.int64).astype(np.float64)
        return np.where(positives > 0, (len(train_labels) - positives) / np.maximum(positives, 1), 1.0)
    if num_labels is not None and len(w) != num_labels:
        raise ConfigError(f"loss.pos_weight has {len(w)} values but the dataset has {num_labels} labels",
                          f"give {num_labels} weights, or pos_weight: auto")
    return np.asarray(w, np.float64)


FLOPS_PER_MAC = 6  # a training step: 2 FLOPs per multiply-add forward, twice that backward (as airbench counts)


def training_pflops(rows: list[LayerRow], images: int) -> float:
    """Training compute in PFLOPs for `images` training images (of any number of epochs): forward MACs x 6.
    Machine-independent, so runs compare across machines; validation and test-time views are not counted."""
    return FLOPS_PER_MAC * sum(r.macs for r in rows) * images / 1e15


def parameter_groups(spec: Spec, rows: list[LayerRow]) -> list[dict]:
    """optimizer.groups resolved against the model (no weights drawn): each group's options and the parameters
    it takes. A group that takes none is a ConfigError."""
    if not spec.optimizer.groups:
        return []
    model, _ = build_model(spec.model, SHAPES_ONLY)
    assigned = assign_groups(spec.optimizer.groups, model, rows)
    return [{"group": i, "match": g.match.model_dump(exclude_none=True), "lr_scale": g.lr_scale,
             "weight_decay": g.weight_decay, "params": [name for name, a in assigned.items() if a is g]}
            for i, g in enumerate(spec.optimizer.groups)]


def shape_text(shape) -> str:
    """An output shape as inspect shows it: (C, H, W), or the number of features alone."""
    return str(shape[0] if len(shape) == 1 else tuple(shape))


def receptive_field_text(rf) -> str:
    """Receptive field as 'size / stride' (one number when square), or 'all' once it covers the whole input."""
    if rf is None:
        return "all"
    size = f"{rf[0]}" if rf[0] == rf[1] else f"{rf[0]}x{rf[1]}"
    stride = f"{rf[2]}" if rf[2] == rf[3] else f"{rf[2]}x{rf[3]}"
    return f"{size} / {stride}"


def inspect_report(spec, rows: list[LayerRow]) -> dict:
    """What `cnnctl inspect` shows: the layer tree, parameter counts, MACs and memory estimates."""
    total = sum(r.params for r in rows)
    frozen = sum(r.frozen for r in rows)
    buffers = sum(r.buffers for r in rows)
    return {
        "name": spec.name, "input_shape": list(spec.model.input_shape),
        "layers": [r.as_dict() for r in rows],
        "total_params": total, "trainable_params": total - frozen, "frozen_params": frozen,
        "non_trainable_params": buffers, "param_bytes": (total + buffers) * 4, "total_macs": sum(r.macs for r in rows),
        "activation_bytes_per_sample": 4 * activation_values(rows),
        "training_bytes": training_bytes(rows, spec.data.batch_size, spec.train.ema_decay is not None),
        "param_groups": parameter_groups(spec, rows),
    }


