"""`cnnctl report`: one self-contained HTML page about a run (or a sweep). Everything is inline: styles in a
<style> element, pictures as PNG data URIs from plots.py, no script, no font, no link outside the file, so the page
opens from a disk, an archive or a mail. The data comes from the library (runs, evaluation, explain); this module
only lays it out, with the pieces of markup.py (shared with the sweep's page).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from cnnctl.errors import CnnctlError
from cnnctl.run import runs
from cnnctl.version import __version__

from . import plots
from .markup import document, escape, figure, img, metric, num, number, pct, table

GALLERY = 8  # the most confidently wrong test images shown
VIEWS = "; each image once, without the config's test-time views, which the test accuracy above averages"

# ---------------------------------------------------------------- a run


def _test_accuracy(summary: dict, measured: dict | None) -> str:
    """The run's test accuracy (test_at_end, or a recorded cnnctl eval), else this page's own evaluation of the
    test split, saying so; "-" without either."""
    test = summary.get("test") if isinstance(summary.get("test"), dict) else {}
    if test:
        by = f" ({test['by']} of {test.get('checkpoint')})" if test.get("by") else ""
        return f"{pct(test.get('accuracy'))} on {test.get('n', 0):,} images{by}"
    if measured and measured["split"] == "test":
        return (f"{pct(measured['accuracy'])} on {measured['n']:,} images (this page's evaluation of "
                f"{measured['checkpoint']}, one view per image)")
    return "-"


def _header(run_dir: Path, summary: dict, info: dict, measured: dict | None = None) -> str:
    env = summary.get("environment") if isinstance(summary.get("environment"), dict) else {}
    best, monitor = summary.get("best") if isinstance(summary.get("best"), dict) else {}, summary.get("monitor")
    blas = env.get("blas") if isinstance(env.get("blas"), dict) else {}
    items = [
        ("status", info.get("status")), ("started", summary.get("started")),
        ("last recorded", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime((run_dir / "summary.json").stat().st_mtime))
         if (run_dir / "summary.json").is_file() else "-"),
        ("epochs", f"{info.get('epochs_done') or 0} of {info.get('epochs') or '?'}"),
        ("wall time", f"{summary['wall_seconds']:.1f} s" if isinstance(summary.get("wall_seconds"), (int, float))
         else "-"),
        ("training compute", f"{summary['training_pflops']:.4g} PFLOPs"
         if isinstance(summary.get("training_pflops"), (int, float)) else "-"),
        ("best epoch", f"{best.get('epoch')} ({monitor} {metric(monitor, best.get(monitor))})" if best else "-"),
        ("test accuracy", _test_accuracy(summary, measured)),
        ("machine", f"{env.get('cpu') or env.get('platform') or '-'}; BLAS {blas.get('library', '-')} "
         f"{blas.get('kernel', '')}".strip()),
        ("command", summary.get("command") or "-"),
        ("threads", summary.get("threads", "-")), ("cnnctl", env.get("cnnctl", __version__)),
        ("parameters", f"{summary['params']:,}" if isinstance(summary.get("params"), int) else "-"),
    ]
    if summary.get("error"):
        items.insert(1, ("error", summary["error"]))
    dl = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items)
    return (f"<header><h1>Run {escape(run_dir.name)}</h1><p class=\"status\">Status: {escape(info.get('status'))}</p>"
            f"<dl>{dl}</dl></header>")


def _curves(history: list[dict]) -> str:
    if not history:
        return "<section><h2>Learning curves</h2><p class=\"note\">No epoch has finished yet.</p></section>"
    png = plots.plot_curves(history, None, "")
    rows = [[r.get("epoch"), num(r.get("train_loss")), pct(r.get("train_acc")), num(r.get("val_loss")),
             pct(r.get("val_acc")), number(r.get("lr"))] for r in history]
    return ("<section><h2>Learning curves</h2>" + figure(png, "Loss, accuracy and learning rate per epoch, "
            "training and validation", "Loss and accuracy (training: circles, validation: squares) and the "
            "learning rate per epoch.") + "<details><summary>The numbers</summary>" +
            table("Every epoch", ["epoch", "train loss", "train acc", "val loss", "val acc", "lr"], rows, left=0)
            + "</details></section>")


def _model_table(spec) -> str:
    from cnnctl.config.build import describe, inspect_report, receptive_field_text, shape_text, walk

    rows = describe(spec.model)
    report = inspect_report(spec, rows)
    body = [["\u00a0\u00a0" * r.depth + r.path.split(".", 1)[1], r.type + (f" {r.name!r}" if r.named else ""),
             shape_text(r.output_shape), f"{r.params:,}", f"{r.macs:,}", receptive_field_text(r.receptive_field)]
            for r in walk(rows)]
    summary = (f"{spec.name}: input {tuple(spec.model.input_shape)}; {report['total_params']:,} parameters, "
               f"{report['total_macs']:,} multiply-adds per image")
    listing = table(summary, ["#", "type", "output shape", "params", "MACs", "receptive field"], body, left=3)
    if len(body) > MODEL_ROWS_OPEN:  # a ResNet's 60 rows: the totals first, the table a click away
        listing = f"<p>{escape(summary)}.</p><details><summary>The {len(body)} layers</summary>{listing}</details>"
    return "<section><h2>Model</h2>" + listing + "</section>"


MODEL_ROWS_OPEN = 25  # longer model tables start collapsed


def _evaluation(ckpt_path: Path) -> tuple[str, dict | None]:
    """Confusion matrix, per-class metrics, confused pairs, calibration, the most confidently wrong images with
    their saliency and Grad-CAM, the first layer's filters: one pass over the test split (else validation).
    Returns the section and what it measured (split, accuracy, n, checkpoint), None without data."""
    from cnnctl import data as data_lib
    from cnnctl.config.build import build_loss
    from cnnctl.core.functional import probabilities
    from cnnctl.core.nn import LOSSES
    from cnnctl.core.plan import Runner
    from cnnctl.run import checkpoint, loading
    from cnnctl.run.evaluation import infer, per_class
    from cnnctl.run.start import run_data

    ckpt = checkpoint.load(ckpt_path)
    spec, model, rows = loading.load_model(ckpt, ckpt_path)
    try:
        ds = run_data(spec, rows, ckpt.normalization or None)
    except CnnctlError as e:
        return (f"<section><h2>Evaluation</h2><p class=\"note\">The data is not at hand: {escape(e.message)}</p>"
                "</section>", None)
    name = "test" if len(ds.test) else "val"
    split = ds.split(name)
    if not len(split):
        return (_data(ds) + "<section><h2>Evaluation</h2><p class=\"note\">No test or validation images.</p>"
                "</section>", None)
    takes = LOSSES[spec.loss.type].takes
    loss_fn = build_loss(spec, ds.train.y, len(ds.classes))
    logits, total, run = [], 0.0, Runner(model)
    for x, y in data_lib.batches(ds, split, spec.data.evaluation_batch):
        out = np.array(infer(run, x), copy=True)  # one view per image: the page stays quick to write
        total += loss_fn.forward(out, y) * len(y)
        logits.append(out)
    if spec.task == "multilabel":
        html, measured = _label_evaluation(np.concatenate(logits), split, total, name, model, ds.classes)
        return _data(ds) + html, {**measured, "checkpoint": ckpt_path.name}
    probs = probabilities(np.concatenate(logits), takes)
    pred, y = probs.argmax(axis=1), split.y
    k, classes = len(ds.classes), ds.classes
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (y, pred), 1)
    pc = per_class(cm)
    acc = float(np.trace(cm) / len(y))
    parts = [f"<section><h2>Evaluation on the {name} split</h2><p>{len(y):,} images: accuracy {pct(acc)}, loss "
             f"{num(total / len(y))} (checkpoint {escape(ckpt_path.name)}, epoch {ckpt.epoch}"
             f"{VIEWS if spec.data.test_time_augment.views > 1 else ''}).</p>"]
    parts += _matrices(cm, classes, name, pc)
    parts += _calibration(probs, pred, y, name)
    parts += _gallery(model, split, probs, pred, y, classes, name, ckpt.normalization)
    parts += _filters(model)
    return _data(ds) + "".join(parts) + "</section>", {"split": name, "accuracy": acc, "n": len(y),
                                                       "checkpoint": ckpt_path.name}


def _label_evaluation(logits: np.ndarray, split, total: float, name: str, model,
                      labels: list[str]) -> tuple[str, dict]:
    """A multi-label model's evaluation section: mAP, micro and macro F1 and subset accuracy, and each label's
    precision, recall, F1 and average precision (a label said present at probability 0.5)."""
    from cnnctl.run.evaluation import label_metrics

    m, n = label_metrics(logits, split.y), len(split)
    res = {**m, "classes": labels}
    rows = [[c, f"{int(m['support'][i]):,}", pct(m["precision"][i]), pct(m["recall"][i]), pct(m["f1"][i]),
             pct(m["average_precision"][i])] for i, c in enumerate(labels)]
    parts = [f"<section><h2>Evaluation on the {name} split</h2><p>{n:,} images, several labels each: mAP "
             f"{pct(m['map'])}, micro F1 {pct(m['micro_f1'])}, macro F1 {pct(m['macro_f1'])}, every label right "
             f"{pct(m['accuracy'])}, loss {num(total / n)} (a label is said present at probability 0.5 or more)."
             "</p>",
             figure(plots.plot_label_results(res, None, f"{name} split"), "Precision, recall and average precision "
                     "of each label", "Each label's precision, recall and average precision; the table below gives "
                     "the same numbers."),
             table("Per label", ["label", "images with it", "precision", "recall", "F1", "average precision"], rows),
             *_filters(model)]
    return "".join(parts) + "</section>", {"split": name, "accuracy": m["accuracy"], "map": m["map"], "n": n}


SAMPLES_PER_CLASS, SAMPLE_CLASSES = 4, 20  # the data section's grid: 4 training images of each of the first 20


def _data(ds) -> str:
    """The data the run saw: images per class in each split, and the first few training images of each class."""
    from cnnctl import data as data_lib

    counts = data_lib.class_counts(ds)
    names = [n for n in ("train", "val", "test") if counts[n]["total"]]
    rows = [[c, *(f"{counts[n]['per_class'][i]:,}" for n in names)] for i, c in enumerate(ds.classes)]
    rows.append(["all classes", *(f"{counts[n]['total']:,}" for n in names)])
    shown, y = ds.classes[:SAMPLE_CLASSES], ds.train.y
    groups = [(k, np.flatnonzero(y[:, k] if y.ndim == 2 else y == k)[:SAMPLES_PER_CLASS]) for k in range(len(shown))]
    idx = np.concatenate([g for _, g in groups]) if groups else np.empty(0, np.int64)
    grid = figure(plots.plot_samples(ds.train.x[idx], [ds.classes[k] for k, g in groups for _ in g], None,
                                      "training images, by class"),
                   "A few training images of each class, titled with their class",
                   f"The first {SAMPLES_PER_CLASS} training images of each class" + (
                       f" (the first {SAMPLE_CLASSES} of {len(ds.classes)} classes)"
                       if len(ds.classes) > SAMPLE_CLASSES else "") + ", as stored (before normalisation).") \
        if len(idx) else ""
    return (f"<section><h2>Data</h2><p>{escape(ds.name)}: {len(ds.classes)} classes, images of "
            f"{' x '.join(str(d) for d in ds.train.x.shape[1:])}.</p>"
            + table("Images per class in each split", ["class", *names], rows) + grid + "</section>")


def _plan(summary: dict) -> str:
    plan = summary.get("plan")
    if not isinstance(plan, dict) or not plan:
        return ""
    counts: dict[str, int] = {}
    for v in plan.values():
        counts[str(v)] = counts.get(str(v), 0) + 1
    return ("<section><h2>Execution plan</h2><p>Convolution algorithms: " + escape(", ".join(
        f"{n} by {a}" for a, n in sorted(counts.items()))) + "</p><details><summary>Per layer</summary>" +
        table("Convolution algorithm per layer", ["layer", "algorithm"], [[k, v] for k, v in plan.items()], left=2)
        + "</details></section>")


def run_page(run_dir: Path) -> str:
    """The page of a run directory, whatever its status (running, failed and interrupted runs show what they
    have)."""
    from cnnctl.config.reading import validate
    from cnnctl.run.weights import checkpoint_file

    run_dir = Path(run_dir)
    info = runs.run_info(run_dir)
    if info is None:
        raise CnnctlError(f"{run_dir} is not a run directory (no config.yaml)",
                          "pass a directory that cnnctl train or cnnctl sweep wrote")
    summary = runs.read_json(run_dir / "summary.json") or {}
    config = runs.config_of(run_dir)
    spec = validate(config, str(run_dir / "config.yaml"))
    try:
        ckpt_path, _ = checkpoint_file(run_dir)
    except CnnctlError:
        ckpt_path = None
    evaluation, measured = _evaluation(ckpt_path) if ckpt_path is not None else (
        "<section><h2>Evaluation</h2><p class=\"note\">No checkpoint yet: the run has not finished an epoch.</p>"
        "</section>", None)
    sections = [_header(run_dir, summary, info, measured)]
    sections.append("<section><h2>Config</h2><details><summary>The resolved config (every key, defaults filled "
                    f"in)</summary><pre>{escape(json.dumps(config, indent=1))}</pre></details></section>")
    sections.append(_model_table(spec))
    sections.append(_curves(runs.read_history(run_dir)))
    sections.append(evaluation)
    sections.append(_plan(summary))
    return document(f"cnnctl run {run_dir.name}", sections)


# ---------------------------------------------------------------- a sweep


def _matrices(cm: np.ndarray, classes: list[str], name: str, pc: dict) -> list[str]:
    """The confusion matrix as a picture and as tables of counts and of row shares, per-class metrics, and the most
    confused pairs."""
    parts, k, (p, r, f1) = [], len(classes), (pc["precision"], pc["recall"], pc["f1"])
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    parts.append(figure(plots.plot_confusion(cm, classes, None, f"{name} split: counts"),
                         "Confusion matrix of counts, true class in rows", "Confusion matrix (rows: true class, "
                         "columns: predicted); the tables below give the same numbers."))
    parts.append(table("Confusion matrix, counts (rows: true class, columns: predicted)", ["true \\ predicted",
                        *classes], [[c, *map(str, cm[i])] for i, c in enumerate(classes)]))
    parts.append(table("Confusion matrix, each row as a share of its true class", ["true \\ predicted", *classes],
                        [[c, *(f"{100 * v:.1f}%" for v in norm[i])] for i, c in enumerate(classes)]))
    parts.append(table("Per class", ["class", "precision", "recall", "F1", "support"],
                        [[c, pct(p[i]), pct(r[i]), pct(f1[i]), f"{int(pc['support'][i]):,}"]
                         for i, c in enumerate(classes)]))
    off = [(cm[i, j], i, j) for i in range(k) for j in range(k) if i != j and cm[i, j]]
    off.sort(reverse=True)
    parts.append(table("The most confused pairs", ["true class", "predicted as", "images", "share of the class"],
                        [[classes[i], classes[j], f"{n:,}", f"{100 * n / max(cm[i].sum(), 1):.1f}%"]
                         for n, i, j in off[:8]], left=2) if off else "<p>No image was misclassified.</p>")
    return parts


def _calibration(probs: np.ndarray, pred: np.ndarray, y: np.ndarray, name: str) -> list[str]:
    """The reliability diagram and the expected calibration error (10 bins)."""
    parts = []
    conf, correct = probs.max(axis=1), (pred == y).astype(np.float64)
    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, 9)
    ece = sum(abs(correct[which == b].mean() - conf[which == b].mean()) * (which == b).mean()
              for b in range(10) if (which == b).any())
    parts.append("<h3>Calibration</h3>" + figure(plots.plot_reliability(conf, correct, None, f"{name} split"),
                 "Reliability diagram: accuracy per confidence bin against the diagonal",
                 "Accuracy in each bin of confidence (the largest probability), with the number of images; the "
                 "dashed diagonal is perfect calibration.") +
                 f"<p>Expected calibration error (10 bins): {100 * ece:.2f}% (the mean gap between confidence and "
                 "accuracy, weighted by the images in each bin).</p>")
    return parts


def _gallery(model, split, probs: np.ndarray, pred: np.ndarray, y: np.ndarray, classes: list[str], name: str,
             normalization: dict) -> list[str]:
    """The most confidently wrong images with their top-3 probabilities, saliency and Grad-CAM."""
    from cnnctl.core.functional import normalize

    from . import explain

    parts, conf = [], probs.max(axis=1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:GALLERY]
    if len(wrong):
        x01 = split.x[wrong].astype(np.float32) / (255.0 if split.x.dtype == np.uint8 else 1.0)
        xn = normalize(x01, normalization)
        sal, _ = explain.saliency(model, xn, pred[wrong])
        try:
            cam, _, layer = explain.gradcam(model, xn, None, pred[wrong])
        except CnnctlError:
            cam, layer = None, None
        cards = []
        for j, idx in enumerate(wrong):
            top = np.argsort(-probs[idx])[:3]
            label = f"true {classes[y[idx]]}, predicted {classes[pred[idx]]}"
            pics = img(plots.plot_explanation(x01[j], sal[j], None, f"saliency for {classes[pred[idx]]}"),
                        f"{label}: the image and its saliency map")
            if cam is not None:
                pics += img(plots.plot_explanation(x01[j], cam[j], None, f"Grad-CAM ({layer}) for "
                                                    f"{classes[pred[idx]]}"), f"{label}: Grad-CAM map")
            tops = ", ".join(f"{classes[t]} {100 * probs[idx, t]:.1f}%" for t in top)
            cards.append(f'<div class="card"><p><strong>{escape(name)} image {idx}</strong>: {escape(label)}.'
                         f"<br>Top 3: {escape(tops)}</p>{pics}</div>")
        parts.append(f"<h3>The {len(wrong)} most confidently wrong images</h3><p>Each with its saliency (max over "
                     "channels of |d logit / d input|) and Grad-CAM map for the predicted class (cnnctl explain)."
                     f'</p><div class="gallery">{"".join(cards)}</div>')
    return parts


def _filters(model) -> list[str]:
    """The first convolution's filters as a grid."""
    from cnnctl.core.nn import Conv2D

    parts = []
    first = next((layer for _, layer in model.named_layers() if isinstance(layer, Conv2D)), None)
    if first is not None:
        parts.append("<h3>The first layer's filters</h3>" + figure(
            plots.plot_filters(first.params["weight"], None, "first convolution"), "The first convolution's "
            "filters as a grid of small images", "Each filter of the first convolution (RGB for colour inputs)."))
    return parts
