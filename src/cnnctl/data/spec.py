"""The `data:` section of a config: the dataset (a registered format), where it is, how it is split, sampled,
normalised and augmented. The format modules register themselves on import (below), before DataSpec is made."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from cnnctl.strict import NonNegInt, PosInt, Strict

# isort: off
from . import shapes, idx, cifar, digits, npz, folder, csvfile, packed  # noqa: F401  each registers its format(s), in order
from .formats import FORMATS
# isort: on


class ShapesSpec(Strict):
    train_size: PosInt = Field(6000, description="Images generated for training (before the validation split).")
    test_size: PosInt = Field(1000, description="Images generated for the test split.")
    kinds: list[Literal["circle", "square", "triangle", "cross", "ring", "bar"]] = Field(
        default=["circle", "square", "triangle", "cross"], min_length=2, description="Shape classes, in label order."
    )
    noise: float = Field(0.15, ge=0.0, le=1.0, description="Std of Gaussian pixel noise on a 0..1 scale.")


class ResizedCropSpec(Strict):
    scale: tuple[float, float] = Field((0.08, 1.0), description="Fraction of the image's area the crop covers: "
                                       "drawn uniformly between these.")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="Aspect ratio (width / height) of the crop: "
                                       "drawn log-uniformly between these.")

    @model_validator(mode="after")
    def _ordered(self):
        (s0, s1), (r0, r1) = self.scale, self.ratio
        if not (0 < s0 <= s1 <= 1 and 0 < r0 <= r1):
            raise ValueError("give scale as [min, max] within (0, 1] and ratio as [min, max] above 0, min <= max")
        return self


class AugmentSpec(Strict):
    random_resized_crop: ResizedCropSpec | None = Field(
        None, description="A random part of each image (its area and aspect ratio drawn from scale and ratio) "
        "resized back to the image's size, bilinearly (torchvision's RandomResizedCrop, for fine-tuning); {} "
        "takes torchvision's defaults.")
    random_crop: NonNegInt = Field(0, description="Pad by this many pixels, then crop back at a random offset.")
    random_shift: float = Field(0.0, ge=0.0, lt=0.5, description="Shift by up to this fraction of the size, "
                                "repeating edge pixels.")
    horizontal_flip: bool | Literal["alternating"] = Field(
        False, description="true: mirror a random half of the images left to right; alternating: each image is "
        "mirrored every other epoch (which half starts is fixed by the seed), so every epoch pair sees both "
        "views (airbench's alternating flip, Jordan 2024).")
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="Probability of setting one random rectangle "
                                  "(2-33% of the image, aspect 0.3-3.3) of an image to 0 (random erasing, cutout).")

    @property
    def active(self) -> bool:
        """Whether any augmentation is asked for."""
        return bool(self.random_crop or self.random_shift or self.horizontal_flip or self.random_erasing
                    or self.random_resized_crop is not None)


class TestTimeAugmentSpec(Strict):
    """Views of every image whose outputs are averaged (validation, test, eval and predict; an exported model is
    the plain network): the image, each shifted copy, and with horizontal_flip the mirror of every one."""

    horizontal_flip: bool = Field(False, description="Average the network's outputs for each image and its mirror "
                                  "image (validation, test, eval and predict; an exported model is the plain "
                                  "network).")
    shifts: list[tuple[int, int]] = Field(
        default=[], max_length=64, description="Also average over copies shifted by [rows, columns] pixels each "
        "(positive: down, right; the edge pixels repeat), e.g. [[1, 1], [-1, -1]]; with horizontal_flip each is "
        "mirrored too.")

    @field_validator("shifts")
    @classmethod
    def _real_shifts(cls, v):
        if any(dy == 0 and dx == 0 for dy, dx in v):
            raise ValueError("[0, 0] is the image itself, which is always one of the views: leave it out")
        if len(set(v)) != len(v):
            raise ValueError("a shift is listed twice: give each once")
        return v

    @property
    def views(self) -> int:
        """How many forward passes one image costs."""
        return (1 + len(self.shifts)) * (2 if self.horizontal_flip else 1)


class DataSpec(Strict):
    dataset: str = Field(description="A registered dataset format (the README's dataset table lists them; the "
                         "schema's enum is the registry's names).",
                         json_schema_extra=lambda schema: schema.update(enum=sorted(FORMATS)))
    path: str | None = Field(None, description="csv: the CSV of pictures, columns path,label and optionally split "
                             "(train, val or test); paths relative to the CSV's folder. packed: the folder "
                             "cnnctl pack wrote.")
    verify: bool = Field(True, description="packed: check every shard's sha256 against the manifest when a run "
                         "opens it (false skips the hashing for very large packs; sizes and headers are still "
                         "checked).")
    root: str | None = Field(None, description="Folder with the dataset files (default ~/.cache/cnnctl/<dataset>, "
                             "or $CNNCTL_DATA/<dataset>); the .npz file for npz; the ImageFolder root for folder.")
    download: bool = Field(False, description="Fetch missing files (mnist, fashion_mnist, kmnist, cifar10) into "
                           "root, verified against SHA-256 checksums.")
    mirror: str | None = Field(None, description="Base URL to download the files from instead of the official ones.")
    classes: list[str] | None = Field(None, description="Class names for npz data (default: 0..max label).")
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="Training-batch augmentation.")
    test_time_augment: TestTimeAugmentSpec = Field(default_factory=TestTimeAugmentSpec,
                                                   description="Augmentation when evaluating and predicting.")
    resize: PosInt | None = Field(None, description="folder data and predict's picture files: scale each picture so "
                                  "that its shorter side has this many pixels (bilinear, aspect kept), then cut the "
                                  "input's height x width from its centre (torchvision's evaluation transform: "
                                  "Resize(256) + CenterCrop(224)); default: stretch the picture to the input size.")
    batch_size: PosInt = 64
    prefetch: bool = Field(True, description="Prepare the next batch (rows read, augmented, normalised) in a "
                           "background thread while the current step runs; the numbers do not depend on it.")
    eval_batch_size: PosInt | None = Field(None, description="Batch size for validation, test, eval and predict "
                                           "(default: batch_size). Evaluation keeps nothing for backward, so it can "
                                           "be larger; the numbers do not depend on it.")
    val_split: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of the training data held out.")
    stratify: bool = Field(False, description="Hold out val_split of every class (the validation split keeps the "
                           "class proportions); off by default so that existing configs keep their exact split.")
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle", description="shuffle: every training image once per epoch; balanced: as many draws, with "
        "replacement, each class equally likely (for imbalanced data).")
    normalize: Literal["auto", "none"] | dict[Literal["mean", "std"], list[float]] = Field(
        "auto", description="auto: per-channel mean/std of the training split; none: pixels in 0..1; or mean/std.")
    shapes: ShapesSpec = Field(default_factory=ShapesSpec, description="Options of the `shapes` generator.")

    @field_validator("dataset")
    @classmethod
    def _registered(cls, v):
        if v not in FORMATS:
            close = difflib.get_close_matches(v.replace("-", "_").lower(), FORMATS, n=1)
            raise PydanticCustomError("unknown_dataset", "{guess}the registered datasets are {names}",
                                      {"guess": f"did you mean '{close[0]}'? " if close else "",
                                       "names": ", ".join(FORMATS)})
        return v

    @model_validator(mode="after")
    def _located(self):
        """data.path for a format located by a file (csv), data.root for the others."""
        fmt = FORMATS[self.dataset]
        if (fmt.located_by == "path") != (self.path is not None):
            by_path = [n for n, f in FORMATS.items() if f.located_by == "path"]
            raise ValueError(f"dataset: {self.dataset} reads {fmt.path_is}; other datasets take data.root"
                             if fmt.located_by == "path" else
                             f"data.path is the file of dataset: {' or '.join(by_path)}; the {self.dataset} data is "
                             "found through data.root")
        return self

    @field_validator("normalize")
    @classmethod
    def _mean_and_std(cls, v):
        if isinstance(v, dict) and set(v) != {"mean", "std"}:
            raise ValueError("give both mean and std lists (one value per channel)")
        if isinstance(v, dict) and any(s <= 0 for s in v["std"]):
            raise ValueError("std values must be positive")
        return v

    @property
    def evaluation_batch(self) -> int:
        """Images per forward pass when evaluating or predicting."""
        return self.eval_batch_size or self.batch_size
