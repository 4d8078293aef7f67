"""The YAML spec as pydantic models, strict and self-explaining.

Every model forbids unknown keys (with a did-you-mean), every layer spec carries a `type` tag and the
layer union is discriminated on it; `LAYER_SPECS` maps those tags to spec classes, and each spec's `build`
makes the matching `cnnctl.nn` layer for the shape that reaches it. Reading a file into a `Spec` is
`reading.py`'s; the JSON Schema is `schema.py`'s.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from cnnctl.core import nn, optim, schedules
from cnnctl.data.formats import FORMATS
from cnnctl.data.spec import DataSpec
from cnnctl.strict import Mode, Monitor, NonNegInt, PosInt, Strict

from . import blocks
from .renames import RENAMES

# ---------------------------------------------------------------- the model

LAYER_SPECS = nn.SPECS  # every `type` a layer can have, derived from the layer registry
AnyLayer = nn.AnyLayer


class InitFromSpec(Strict):
    checkpoint: str = Field(min_length=1, description="A cnnctl checkpoint or run directory, or any safetensors "
                            "file of tensors (a PyTorch state_dict saved with safetensors); `path:` is the same key.")
    rename: Literal[tuple(RENAMES)] | list[tuple[str, str]] | None = Field(
        None, description="How the file's tensor names become the model's: [[REGEX, REPLACEMENT], ...] applied in "
        "order to every name (re.sub), or a shipped map: " + ", ".join(RENAMES) + " (for configs/torchvision/).")
    strict: bool = Field(False, description="true: every parameter and buffer must be copied and every tensor "
                         "of the file used, else an error.")

    @model_validator(mode="before")
    @classmethod
    def _path_is_checkpoint(cls, data):
        """`path:` is accepted for `checkpoint:` (a state dict of another framework is no checkpoint)."""
        if isinstance(data, dict) and "path" in data:
            if "checkpoint" in data:
                raise ValueError("give the file as checkpoint or as path, not both")
            data = {("checkpoint" if k == "path" else k): v for k, v in data.items()}
        return data

    @field_validator("rename")
    @classmethod
    def _patterns_compile(cls, v):
        for pattern, _ in v if isinstance(v, list) else []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None
        return v


class ModelSpec(Strict):
    init_from: InitFromSpec | None = Field(None, description="Start from another model's weights: every "
                                           "parameter and buffer whose name and shape match is copied, the rest "
                                           "start fresh (Caffe's -weights). For a new run only; --resume continues "
                                           "from the run's own checkpoint.")
    input_shape: tuple[PosInt, PosInt, PosInt] = Field(description="Input shape per sample: [channels, height, width].")
    blocks: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Your own layer types: name -> {params: {name: default, ...}, and a layer "
        "(type: residual | concat | sequential | ...) whose values may be $name}. Use as {type: name, param: value, "
        "repeat: N}. A parameter whose default is null must be given.")
    layers: list[AnyLayer] = Field(min_length=1, description="Layers in order; input sizes are inferred.")

    @field_validator("blocks")
    @classmethod
    def _block_names(cls, v):
        for name, body in v.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"block name {name!r}: use letters, digits and '_'")
            if name in nn.SPECS:
                raise ValueError(f"block name {name!r} is a built-in layer type; pick another name")
            if not isinstance(body, dict) or "type" not in body:
                raise ValueError(f"block {name!r} needs a 'type' (e.g. residual, concat or sequential)")
        return v

    def tree(self) -> list:
        """The layers with every block use expanded into concrete layer specs (validate() has checked that
        this succeeds, with line numbers in its errors)."""
        return blocks.resolve(self)


# ---------------------------------------------------------------- data, loss, optimizer, training


# other frameworks' names of cnnctl's losses: a config that uses one gets a did-you-mean naming the framework
FOREIGN_LOSSES = {
    "categorical_crossentropy": ("cross_entropy", "Keras"),
    "sparse_categorical_crossentropy": ("cross_entropy", "Keras"),
    "CategoricalCrossentropy": ("cross_entropy", "Keras"), "SparseCategoricalCrossentropy": ("cross_entropy", "Keras"),
    "CrossEntropyLoss": ("cross_entropy", "PyTorch"), "cross_entropy_loss": ("cross_entropy", "PyTorch"),
    "crossentropy": ("cross_entropy", None), "cross-entropy": ("cross_entropy", None), "ce": ("cross_entropy", None),
    "softmax_cross_entropy": ("cross_entropy", "TensorFlow"), "SoftmaxWithLoss": ("cross_entropy", "Caffe"),
    "NLLLoss": ("nll", "PyTorch"), "nll_loss": ("nll", "PyTorch"),
    "MSELoss": ("mse", "PyTorch"), "mean_squared_error": ("mse", "Keras"), "MeanSquaredError": ("mse", "Keras"),
    "EuclideanLoss": ("mse", "Caffe"), "l2": ("mse", None),
    "binary_crossentropy": ("bce_with_logits", "Keras"), "BinaryCrossentropy": ("bce_with_logits", "Keras"),
    "BCEWithLogitsLoss": ("bce_with_logits", "PyTorch"), "BCELoss": ("bce_with_logits", "PyTorch"),
}


class LossSpec(Strict):
    type: Literal[tuple(nn.LOSSES)] = "cross_entropy"  # derived from the loss registry

    @field_validator("type", mode="before")
    @classmethod
    def _foreign_names(cls, v):
        if isinstance(v, str) and v in FOREIGN_LOSSES:
            ours, where = FOREIGN_LOSSES[v]
            note = (" bce_with_logits takes logits (no sigmoid before it) and trains several labels per image "
                    "(task: multilabel); for one of two classes, give the last dense layer 2 units and use "
                    "cross_entropy" if ours == "bce_with_logits" else
                    " cnnctl's cross_entropy takes logits (no softmax before it) and "
                    "integer labels, like PyTorch's" if ours == "cross_entropy" else "")
            whose = f"{where}'s" if where else "another framework's"
            raise PydanticCustomError("foreign_loss", "{msg}",
                                      {"msg": f"{v} is {whose} name; did you mean '{ours}'?{note}"})
        return v
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weights: Literal["auto"] | list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="cross_entropy only: a weight per class (PyTorch's weight=), or auto: inverse class "
        "frequency of the training split, n / (classes * count), so that the average weight per image is 1.")
    pos_weight: Literal["auto"] | list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="bce_with_logits only: a weight per label on its positive term (PyTorch's pos_weight=), "
        "or auto: negatives / positives of each label in the training split.")

    @model_validator(mode="after")
    def _weights_need_cross_entropy(self):
        if self.pos_weight is not None and self.type != "bce_with_logits":
            raise ValueError("pos_weight applies to bce_with_logits only")
        if self.class_weights is not None and self.type != "cross_entropy":
            raise ValueError("class_weights apply to cross_entropy only")
        if self.label_smoothing and self.type != "cross_entropy":
            raise ValueError("label_smoothing applies to cross_entropy only")
        return self


OptimizerSpec = Annotated[Union[tuple(dict.fromkeys(optim.OPTIMIZER_SPECS.values()))],  # noqa: UP007
                          Field(discriminator="type")]  # derived from the optimizer registry




ScheduleSpec = Annotated[Union[tuple(schedules.SCHEDULE_SPECS.values())],  # noqa: UP007
                         Field(discriminator="type")]  # derived from the schedule registry


class EarlyStoppingSpec(Strict):
    monitor: Monitor = "val_loss"
    mode: Mode = Field("auto", description="auto: max for accuracies, min for losses.")
    patience: PosInt = Field(5, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement.")


class TrainSpec(Strict):
    epochs: PosInt = 10
    test_at_end: bool = Field(False, description="Evaluate the test split after the last epoch.")
    monitor: Monitor = Field("val_acc", description="Metric that picks checkpoints/best.safetensors.")
    grad_clip_norm: float | None = Field(None, gt=0.0, description="Clip the global gradient norm to this.")
    early_stopping: EarlyStoppingSpec | None = None
    checkpoint_every: PosInt | None = Field(None, description="Also keep checkpoints/epoch-NNNN.safetensors "
                                            "every this many epochs.")
    keep_last: PosInt | None = Field(None, description="How many epoch checkpoints to keep (default: all).")
    checkpoint_every_steps: PosInt | None = Field(None, description="Also update last.safetensors every this "
                                                  "many optimizer steps (for long epochs).")
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="Also log to: tensorboard (RUN/tensorboard/, the tensorboard extra), "
        "mlflow (MLFLOW_TRACKING_URI, else RUNS_DIR/mlflow.db; the mlflow extra).")
    cache_frozen: bool = Field(False, description="Compute the frozen layers at the start of the model (those below "
                               "the first that trains) once per image, and train the rest on their outputs: the "
                               "same numbers, without running the frozen part every epoch. Needs no augmentation "
                               "of the input, no test-time views and no unfreeze_at_epoch.")
    unfreeze_at_epoch: PosInt | None = Field(None, description="Make every layer trainable from this epoch on "
                                             "(1-based; layers frozen with trainable: false train from then).")
    validate_every: PosInt = Field(1, description="Validate after every this many epochs and after the last "
                                   "(Lightning's check_val_every_n_epoch); the epochs between have no val_ metrics, "
                                   "and checkpoints/best and val_ monitors only consider validated epochs.")
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, description="Keep an exponential moving average of the "
                                    "weights (and running statistics), 0.999 for example; validation, the test, "
                                    "the checkpoints' model and so eval, predict and export use the average.")
    sync_batchnorm: bool = Field(True, description="With several MPI ranks (mpiexec -n N cnnctl train): batchnorm "
                                 "statistics over the whole global batch, summed across the ranks (SyncBatchNorm: the "
                                 "model one process would train); false: each rank normalises its own share (ghost "
                                 "batchnorm over data.batch_size / N images: fewer messages, another model). No effect "
                                 "in one process.")
    autotune: bool = Field(False, description="Time every convolution algorithm each layer can run by (lowering, "
                           "pointwise, Winograd F(2x2,3x3) and F(4x4,3x3)) once on this machine and train with the "
                           "fastest (cached in ~/.cache/cnnctl/plans/); false: the shape rule, the same plan on every "
                           "machine. The plan used is recorded in summary.json and the checkpoints; a resumed run "
                           "keeps it.")


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=100,
                      description="Run name; letters, digits, '_', '.', '-' (at most 100).")
    seed: NonNegInt = 0
    data: DataSpec
    model: ModelSpec
    loss: LossSpec = Field(default_factory=LossSpec)
    optimizer: OptimizerSpec = Field(default_factory=lambda: optim.OPTIMIZER_SPECS["sgd"](type="sgd"))
    schedule: ScheduleSpec = Field(default_factory=lambda: schedules.SCHEDULE_SPECS["constant"](type="constant"))
    train: TrainSpec = Field(default_factory=TrainSpec)
    task: Literal["classification", "multilabel"] | None = Field(
        None, description="classification: one class per image; multilabel: any number of labels per image, one "
        "output each (loss: bce_with_logits; data: a CSV whose label column lists them, a|b|c). Default: "
        "multilabel for loss bce_with_logits, else classification.")

    @model_validator(mode="after")
    def _task_fits_loss_and_data(self):
        multi = self.loss.type == "bce_with_logits"
        if self.task is None:
            self.__dict__["task"] = "multilabel" if multi else "classification"  # no re-validation
        if (self.task == "multilabel") != multi:
            raise PydanticCustomError("task_loss", "task is {task} but loss is {loss}; multilabel goes with loss "
                                      "bce_with_logits, classification with the others",
                                      {"task": self.task, "loss": self.loss.type})
        if self.task == "multilabel":
            fmt = FORMATS[self.data.dataset]
            if not fmt.multilabel:
                formats = ", ".join(name for name, f in FORMATS.items() if f.multilabel)
                raise PydanticCustomError("multilabel_data", "task: multilabel needs labels per image from data "
                                          "that lists them (dataset: {formats}); the {dataset} data has one class "
                                          "per image", {"formats": formats, "dataset": self.data.dataset})
            used = [key for key, on in (("data.sampler: balanced", self.data.sampler == "balanced"),
                                        ("data.stratify", self.data.stratify)) if on]
            if used:
                raise PydanticCustomError("multilabel_classes", "{keys} draws or holds out images class by class; "
                                          "with task: multilabel an image has several labels: leave it out",
                                          {"keys": " and ".join(used)})
        return self

    @model_validator(mode="after")
    def _crop_fits_the_image(self):
        crop, side = self.data.augment.random_crop, max(self.model.input_shape[1:])
        if crop > side:
            raise PydanticCustomError(
                "crop_too_large", "data.augment.random_crop is {crop}, more than the image ({side} pixels); pad by "
                "at most the image size (4 is usual for 32 pixels)", {"crop": crop, "side": side})
        return self

    @model_validator(mode="after")
    def _cache_frozen_needs_fixed_inputs(self):
        t, d = self.train, self.data
        why = ("data.augment changes the images every epoch" if d.augment.active else
               "data.test_time_augment runs the model on several views of each image" if d.test_time_augment.views > 1
               else "train.unfreeze_at_epoch makes the frozen layers train" if t.unfreeze_at_epoch else None)
        if t.cache_frozen and why:
            raise PydanticCustomError("cache_frozen", "train.cache_frozen computes the frozen layers once per image, "
                                      "but {why}; leave one of them out", {"why": why})
        return self

    @model_validator(mode="after")
    def _resize_fits_the_input(self):
        r, (h, w) = self.data.resize, self.model.input_shape[1:]
        if r is not None and not FORMATS[self.data.dataset].pictures:
            pictures = ", ".join(name for name, f in FORMATS.items() if f.pictures)
            raise PydanticCustomError("resize_needs_pictures", "data.resize applies to picture files (dataset: "
                                      "{pictures}, and predict); the {dataset} data has its own size", {
                                          "dataset": self.data.dataset, "pictures": pictures})
        if r is not None and r < max(h, w):
            raise PydanticCustomError(
                "resize_too_small", "data.resize is {r}: the shorter side must have at least {side} pixels to cut "
                "the {h}x{w} input from it (256 for 224 is usual)", {"r": r, "side": max(h, w), "h": h, "w": w})
        return self

    @model_validator(mode="after")
    def _shifts_fit_the_image(self):
        h, w = self.model.input_shape[1:]
        for dy, dx in self.data.test_time_augment.shifts:
            if abs(dy) >= h or abs(dx) >= w:
                raise PydanticCustomError(
                    "shift_too_large", "data.test_time_augment.shifts has [{dy}, {dx}], as far as or beyond the "
                    "{h}x{w} image; shift by less than its size (1 or 2 pixels is usual)",
                    {"dy": dy, "dx": dx, "h": h, "w": w})
        return self

    @model_validator(mode="after")
    def _monitors_need_validation_data(self):
        t = self.train
        used = [("train.monitor", t.monitor)]
        if t.early_stopping:
            used.append(("train.early_stopping.monitor", t.early_stopping.monitor))
        if self.schedule.type == "reduce_on_plateau":
            used.append(("schedule.monitor", self.schedule.monitor))
        for key, monitor in used:
            if monitor.startswith("val_") and self.data.val_split == 0:
                raise PydanticCustomError(
                    "needs_val", "{key} is {monitor} but data.val_split is 0; set data.val_split > 0 or monitor "
                    "a train_ metric", {"key": key, "monitor": monitor})
        return self

    @field_validator("loss", "optimizer", "schedule", mode="before")
    @classmethod
    def _shorthand(cls, v, info):
        """`loss: mse` means {type: mse} (likewise optimizer and schedule); an optimizer without a type is sgd."""
        if isinstance(v, str):
            return {"type": v}
        if info.field_name == "optimizer" and isinstance(v, dict) and "type" not in v:
            return {"type": "sgd", **v}
        return v
