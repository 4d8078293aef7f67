"""Evaluation: a model's outputs for a batch (test-time views included), a split's loss, accuracy, confusion matrix
and per-class precision and recall (its share on each MPI rank), and a checkpoint evaluated on its own data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnctl import data
from cnnctl.config.build import evaluation_loss
from cnnctl.core import plan
from cnnctl.core.nn import Loss
from cnnctl.data.spec import TestTimeAugmentSpec
from cnnctl.errors import CnnctlError, DataError

from . import checkpoint, distributed, loading
from .start import data_as_run
from .weights import checkpoint_file

SPLITS = ("test", "val", "train")


def infer(net: plan.Runner, x: np.ndarray, tta: TestTimeAugmentSpec | None = None) -> np.ndarray:
    """The outputs of the model a runner runs for a batch (inference mode); with test-time augmentation the mean
    of the outputs for the views of each image it asks for (mirror, shifted copies)."""
    if tta is None or tta.views == 1:
        return net.forward(x, training=False)
    views = data.augment.test_time_views(x, tta)
    out = np.array(net.forward(next(views), training=False), copy=True)  # the next forward may reuse its buffer
    for view in views:
        out += net.forward(view, training=False)
    out *= out.dtype.type(1 / tta.views)
    return out


def evaluate(net: plan.Runner, loss_fn: Loss, ds: data.Dataset, split: data.Split, batch_size: int,
             num_classes: int, tta: TestTimeAugmentSpec | None = None,
             world: distributed.World | None = None, prefetch: bool = True) -> dict:
    """Mean loss, accuracy and the confusion matrix (rows: true class, columns: predicted) of one split; for
    multi-label data (labels (N, labels)) the per-label results instead (`label_metrics`). With several ranks
    each evaluates its share of every batch and the sums are reduced."""
    world = world or distributed.World()
    n, multilabel = len(split), split.y.ndim == 2
    total_loss, confusion = 0.0, np.zeros((num_classes, num_classes), np.int64)
    scores = np.zeros((n, num_classes) if multilabel else (0, 0))  # each image's logits at its row (summed: MPI)
    batches = data.batches(ds, split, batch_size, share=world.shard if world.size > 1 else None)
    with data.prefetch.prefetched(batches, on=prefetch) as feed:
        for b, (x, y) in enumerate(feed):
            if not len(y):  # a rank with no rows of a short last batch
                continue
            out = infer(net, x, tta)
            total_loss += loss_fn.forward(out, y) * len(y)
            if multilabel:
                lo = b * batch_size + (world.shard(min(batch_size, n - b * batch_size))[0] if world.size > 1 else 0)
                scores[lo : lo + len(y)] = out
            else:
                np.add.at(confusion, (y, out.argmax(axis=1)), 1)
    summed = scores.ravel() if multilabel else confusion.ravel()
    if world.size > 1:
        sums = world.sum(np.concatenate([[total_loss], summed]).astype(np.float64))
        total_loss, summed = float(sums[0]), sums[1:]
    if multilabel:
        return {"loss": total_loss / max(n, 1), "n": n, **label_metrics(summed.reshape(scores.shape), split.y)}
    confusion = np.rint(summed).astype(np.int64).reshape(confusion.shape)
    return {"loss": total_loss / max(n, 1), "accuracy": float(np.trace(confusion) / max(n, 1)), "n": n,
            "confusion_matrix": confusion, **per_class(confusion)}


def label_metrics(logits: np.ndarray, y: np.ndarray) -> dict:
    """Multi-label results from every image's logits and its 0/1 labels (N, labels), a label decided present
    where its logit is above 0 (probability 0.5): subset accuracy (every label of an image right), each label's
    support (images with it), precision, recall, F1 and average precision (scikit-learn's, over the ranking of
    its scores), micro F1 (over all decisions), macro F1 and mAP (means over the labels; mAP over the labels
    some image has)."""
    y = y.astype(bool)
    said = logits > 0
    tp, fp, fn = (said & y).sum(axis=0), (said & ~y).sum(axis=0), (~said & y).sum(axis=0)
    precision, recall, f1 = _scores(tp, fp, fn)
    ap = np.array([average_precision(logits[:, j], y[:, j]) for j in range(y.shape[1])])
    present = y.sum(axis=0) > 0
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
    return {"accuracy": float((said == y).all(axis=1).mean()) if len(y) else 0.0, "support": y.sum(axis=0),
            "precision": precision, "recall": recall, "f1": f1, "average_precision": ap,
            "micro_f1": float(micro), "macro_f1": float(f1.mean()) if len(f1) else 0.0,
            "map": float(ap[present].mean()) if present.any() else 0.0}


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """The area under one label's precision-recall steps over its images ranked by score, equal scores taken
    together: sum over thresholds of (recall gained) x precision (scikit-learn's average_precision_score); 0 for
    a label no image has."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order].astype(np.int64)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last image of each run of equal scores
    tps = np.cumsum(t)[last]
    if not len(tps) or tps[-1] == 0:
        return 0.0
    precision = tps / (last + 1)
    recall_gained = np.diff(np.r_[0, tps]) / tps[-1]
    return float((recall_gained * precision).sum())


def per_class(confusion: np.ndarray) -> dict:
    """Support, precision, recall and F1 of each class from a confusion matrix (rows: true class); 0 where a class
    was never predicted or never present."""
    hits, predicted, present = np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1)
    p, r, f1 = _scores(hits, predicted - hits, present - hits)
    return {"support": present, "precision": p, "recall": r, "f1": f1}


def _scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 (2 tp / (2 tp + fp + fn): the harmonic mean of the two) of each class or label
    from its counts of true positives, false positives and false negatives; 0 where a ratio has no denominator."""
    tp, fp, fn = (np.asarray(a, np.float64) for a in (tp, fp, fn))

    def ratio(num, den):
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    return ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn)


def evaluate_checkpoint(path: Path, split: str | None, overrides: list[str]) -> dict:
    """A checkpoint (or a run directory's best) on a split of the data its run saw: loss, accuracy, per-class
    precision, recall, F1 and support, and the confusion matrix. split None: test, or val without a test split."""
    if split not in (*SPLITS, None):
        raise CnnctlError(f"split must be test, val or train, got {split!r}")
    ckpt_path = checkpoint_file(path)[0]
    ckpt = loading.with_overrides(checkpoint.load(ckpt_path), overrides)
    spec, model, rows = loading.load_model(ckpt, ckpt_path)
    ds = data_as_run(spec, ckpt.normalization or None)
    if split is None:
        split = "test" if len(ds.test) else "val"
    if not len(ds.split(split)):
        raise DataError(f"the {split} split of the {spec.data.dataset} data holds no images",
                        "choose another split" + (" (val_split is 0: no validation split)" if split == "val" else ""))
    batch = min(spec.data.evaluation_batch, len(ds.split(split)))
    res = evaluate(plan.Runner(model), evaluation_loss(spec, rows, ds.train.y, len(ds.classes), batch), ds,
                   ds.split(split), spec.data.evaluation_batch, len(ds.classes), spec.data.test_time_augment,
                   prefetch=spec.data.prefetch)
    common = {"checkpoint": str(ckpt_path), "epoch": ckpt.epoch, "dataset": spec.data.dataset, "split": split,
              "task": spec.task, "n": res["n"], "loss": res["loss"], "accuracy": res["accuracy"],
              "classes": list(ds.classes), "precision": res["precision"].tolist(), "recall": res["recall"].tolist(),
              "f1": res["f1"].tolist(),
              "support": [int(v) for v in res["support"]]}
    if spec.task == "multilabel":  # accuracy: every label of an image right
        return {**common, "average_precision": res["average_precision"].tolist(), "map": res["map"],
                "micro_f1": res["micro_f1"], "macro_f1": res["macro_f1"]}
    return {**common, "confusion_matrix": res["confusion_matrix"].tolist()}
