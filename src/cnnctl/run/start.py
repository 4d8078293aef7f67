"""A training run's start: the checks that need the data's kind, the dataset, model.init_from, patch whitening,
the loss, optimizer, weight average and schedule, and the runner with the run's convolution algorithms, built in
the order their checks need (`start`, the trainer's one entry into the spec)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from cnnctl import data
from cnnctl.config.build import (
    LayerRow,
    build_loss,
    build_model,
    check_evaluation_memory,
    check_loss_fits,
    check_outputs,
    check_training_memory,
    describe,
    parameter_groups,
)
from cnnctl.config.spec import Spec
from cnnctl.core.nn import Loss, Model
from cnnctl.core.plan import Runner
from cnnctl.errors import DataError

from . import checkpoint, distributed


@dataclass
class Seeds:
    """Independent streams from one seed: weights and dropout, data generation and splits, shuffling,
    augmentation. (Spawned children do not depend on how many are spawned, so streams can be added.)"""

    init: np.random.Generator
    data: np.random.Generator
    shuffle: np.random.Generator
    augment: np.random.Generator

    @classmethod
    def from_seed(cls, seed: int) -> Seeds:
        return cls(*np.random.default_rng(seed).spawn(len(checkpoint.STREAMS)))

    def state(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k).bit_generator.state)
                for k in checkpoint.STREAMS}

    def restore(self, state: dict) -> None:
        for k, v in state.items():
            getattr(self, k).bit_generator.state = v  # in place: layers holding the generator see it too


def check_known_data(spec: Spec, rows: list[LayerRow]) -> None:
    """What can be checked without reading the data: the loss against the model's outputs, and the dataset's
    class count and image shape."""
    check_loss_fits(spec)
    parameter_groups(spec, rows)  # every group takes some parameter
    classes, image_shape = data.dataset_info(spec.data)
    if classes is not None:
        check_outputs(spec, rows, len(classes))
    if image_shape is not None and tuple(image_shape) != tuple(spec.model.input_shape):
        raise DataError(f"dataset '{spec.data.dataset}' has images of shape {tuple(image_shape)} but "
                        f"model.input_shape is {list(spec.model.input_shape)}",
                        f"set model.input_shape: {list(image_shape)}")


def checked_model(spec: Spec, rng: np.random.Generator) -> tuple[Model, list[LayerRow]]:
    """The model a training run of spec starts with and its layer rows, built once every check that reads no data
    has passed (`check_without_data`: its training memory, its outputs and loss against the data's kind), before
    any weight is drawn."""
    check_without_data(spec)
    return build_model(spec.model, rng)


def check_without_data(spec: Spec, world: distributed.World | None = None) -> None:
    """Every check of a training run of spec that reads no data: training memory, the model, its loss and outputs
    against the data's known kind, and with `world` the global batch's cut across the ranks. Under MPI rank 0
    runs these first, alone, so that a config error is said once (the ranks then build at once, each meeting the
    same checks)."""
    rows = describe(spec.model)
    check_training_memory(spec.name, rows, spec.data.batch_size, averaged=spec.train.ema_decay is not None)
    check_known_data(spec, rows)
    if world is not None:
        distributed.check_batches(spec.data.batch_size, None, world.size)


@dataclass
class TrainingParts:
    """What trains a model on a dataset: the loss, the optimizer, the weight average (train.ema_decay) and the
    learning-rate schedule, with the number of steps in an epoch."""

    loss_fn: Loss
    optimizer: object
    average: object | None
    schedule: object
    steps_per_epoch: int


def training_parts(spec: Spec, model: Model, rows: list[LayerRow], ds) -> TrainingParts:
    """The loss (class weights from ds's training labels), optimizer, average and schedule a spec asks for, once
    the evaluation batch is known to fit."""
    from cnnctl.core.averaging import WeightAverage

    check_evaluation_memory(spec.name, rows, min(spec.data.evaluation_batch, max(len(ds.val), len(ds.test), 1)))
    loss_fn = build_loss(spec, ds.train.y, len(ds.classes))
    optimizer = spec.optimizer.build(model, rows)
    decay = spec.train.ema_decay
    steps = -(-len(ds.train) // spec.data.batch_size)
    return TrainingParts(loss_fn, optimizer, WeightAverage(model, decay) if decay else None,
                         spec.schedule.build(optimizer.lr, steps, spec.train.epochs), steps)


def dataset(spec: Spec, rows: list[LayerRow], rng: np.random.Generator, normalization: dict | None = None,
            progress=None, world: distributed.World | None = None) -> data.Dataset:
    """The dataset with the run's own validation split (the data stream depends on its generator alone); the
    model (its layer rows) must end in one output per class. Under MPI the ranks share the reading a run does
    before its first batch: each verifies its part of a pack's shards and sums its part of the training images
    for normalize: auto."""
    ds = _load(spec, rng, normalization, progress, world)
    check_outputs(spec, rows, len(ds.classes))
    return ds


def _load(spec: Spec, rng: np.random.Generator, normalization: dict | None, progress=None,
          world: distributed.World | None = None) -> data.Dataset:
    norm = (normalization["mean"], normalization["std"]) if normalization else None
    if world is None or world.size == 1:
        return data.load_dataset(spec.data, spec.model.input_shape, rng, norm, progress,
                                 multilabel=spec.task == "multilabel")
    hosts = [r["host"] for r in world.ranks()]  # each host's copy of a pack is verified once, by its own ranks
    return data.load_dataset(spec.data, spec.model.input_shape, rng, norm, progress, part=host_part(hosts, world.rank),
                             multilabel=spec.task == "multilabel",
                             statistics=lambda x: shared_statistics(world, x))


def host_part(hosts: list[str], rank: int) -> tuple[int, int]:
    """(this rank's place among the ranks on its host, how many ranks that host has): the part of the files it
    verifies. A pack on a filesystem every host mounts is then verified once per host, a copy on each host once."""
    mine = [r for r, host in enumerate(hosts) if host == hosts[rank]]
    return mine.index(rank), len(mine)


def shared_statistics(world: distributed.World, x) -> tuple[np.ndarray, np.ndarray]:
    """normalize: auto's mean and standard deviation with the training images cut across the ranks: each sums
    its rows (exact integers, so every rank and one process get the same numbers) and one reduction adds them.
    Float images (an .npz of floats) are summed whole on every rank."""
    if x.dtype != np.uint8:
        return data.channel_statistics(x)
    lo, hi = world.shard(len(x))
    return data.statistics_of(world.sum(data.channel_sums(x, slice(lo, hi))), len(x) * x.shape[2] * x.shape[3])


def data_as_run(spec: Spec, normalization: dict | None = None, progress=None) -> data.Dataset:
    """The dataset exactly as a run of spec saw it (the data stream of its seed), with the checkpoint's
    normalization when given; the model's outputs are not checked against it (`run_data` does)."""
    return _load(spec, Seeds.from_seed(spec.seed).data, normalization, progress)


def run_data(spec: Spec, rows: list[LayerRow], normalization: dict | None = None, progress=None) -> data.Dataset:
    """data_as_run, for a model (its layer rows) that must end in one output per class."""
    return dataset(spec, rows, Seeds.from_seed(spec.seed).data, normalization, progress)


@dataclass
class Start:
    """Everything a training run of a spec starts from, built in the order its checks need."""

    model: Model
    rows: list[LayerRow]
    init_report: dict | None  # what model.init_from copied (None without one, or when resuming)
    ds: data.Dataset
    whitening: dict | None  # the patch-whitening record of a new run's first convolution
    parts: TrainingParts
    runner: Runner  # runs the model through its plan, told the share of the batch (MPI)
    algorithms: dict[str, str] | None  # a new run's convolution algorithms (a resumed run takes its checkpoint's)


def start(spec: Spec, init_rng: np.random.Generator, data_rng: np.random.Generator,
          normalization: dict | None = None, resuming: bool = False, progress=None,
          world: distributed.World | None = None) -> Start:
    """The model (every check that needs no data first), model.init_from's weights for a new run, the data, a new
    run's patch whitening, then the loss, optimizer, average and schedule, and the runner with a new run's
    convolution algorithms: what the trainer is built from, the spec going down through this one function."""
    from . import whitening
    from .weights import init_from

    world = world or distributed.World()
    model, rows = checked_model(spec, init_rng)
    init = spec.model.init_from
    # a new run starts from init_from's weights; a resumed one from its own checkpoint (the trainer's restore)
    report = None if init is None or resuming else init_from(model, init.checkpoint, init.strict, init.rename)
    ds = dataset(spec, rows, data_rng, normalization, progress, world)
    # a new run's first convolution from the patch covariance (a resumed run has it, init_from brings its own)
    white = None if resuming or init is not None else whitening.apply(model, ds)
    parts = training_parts(spec, model, rows, ds)
    if world.size > 1:  # several MPI ranks: each trains on its share of every batch
        distributed.check_batches(spec.data.batch_size, len(ds.train), world.size)
    runner = Runner(model, context=distributed.context_of(world, spec.train.sync_batchnorm))
    algorithms = None if resuming else runner.fix_algorithms(
        spec.model.input_shape, spec.data.batch_size // world.size, spec.train.autotune)
    return Start(model, rows, report, ds, white, parts, runner, algorithms)
