"""Pictures: training curves, filters and feature maps, confusion matrices (PNG via matplotlib, the optional
`plot` extra), and a plain-text chart for the terminal that needs nothing extra."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from cnnctl.core.fileio import atomic_write_bytes
from cnnctl.errors import CnnctlError
from cnnctl.extras import require


def pyplot(instead: str | None = None):
    """matplotlib.pyplot on the non-interactive Agg backend, or a clear message naming the extra (and, when the
    verb has one, `instead`: what works without it)."""
    matplotlib = require("matplotlib", "plot", "drawing PNG files needs matplotlib, which is not installed",
                         instead=f"or {instead}" if instead else None)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # every string cnnctl draws comes from a run (class names, file names, config values): plain text, never
    # mathtext, where `$` starts a formula ($\evil$ raised, invoice_$100_to_$200.png was set as maths)
    matplotlib.rcParams["text.parse_math"] = False
    return plt


TERMINAL = "leave out --out for charts in the terminal"


DPI = 110  # pixels per inch of every picture: a 10-point font is 15 pixels tall at 100% zoom


def _save(fig, out: Path | None) -> bytes | None:
    """Render the figure as a PNG: written through fileio.atomic_write_bytes (a file replaced atomically, a device
    or FIFO written in place), or with `out` None returned as bytes (the report inlines them)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    if out is None:
        return buf.getvalue()
    atomic_write_bytes(Path(out), buf.getvalue())
    return None


def plot_curves(history: list[dict], out: Path | None, title: str = "") -> bytes | None:
    """Loss, accuracy (train and validation) and learning rate per epoch, three panels in one PNG."""
    plt = pyplot(TERMINAL)
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(history)]  # rows as runs.read_history cleans them
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [r.get(f"{split}_{key}") for r in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [math.nan if v is None else v for v in values], style, ms=3, label=split)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    lrs = [r.get("lr") for r in history]
    axes[2].plot(epochs, [math.nan if v is None else v for v in lrs], "-o", ms=3, color="tab:green")
    axes[2].set_title("learning rate")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:  # epochs are whole numbers: no 1.5 on the axis of a 3-epoch run
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def _grid(images: np.ndarray, cols: int, cmap: str, out: Path | None, title: str, labels: list[str] | None = None,
          limits: tuple[float, float] | None = None) -> bytes | None:
    plt = pyplot()
    vmin, vmax = limits or (None, None)
    n = len(images)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.5), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            img = images[k]
            ax.imshow(img, cmap=None if img.ndim == 3 else cmap, interpolation="nearest", vmin=vmin, vmax=vmax)
            if labels:
                ax.set_title(labels[k], fontsize=8)
    fig.suptitle(title)
    return _save(fig, out)


def _unit(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def plot_filters(weight: np.ndarray, out: Path | None, title: str) -> bytes | None:
    """A conv layer's kernels (O, C, KH, KW) as a grid: RGB when C is 3, else one image per input channel 0."""
    if weight.shape[1] == 3:
        images = [_unit(w.transpose(1, 2, 0)) for w in weight]
    else:
        images = [w[0] for w in weight]
    return _grid(np.asarray(images), min(8, len(images)), "gray", out, title, [f"{i}" for i in range(len(images))])


def plot_samples(images: np.ndarray, labels: list[str], out: Path | None, title: str) -> bytes | None:
    """Dataset images (N, C, H, W) as stored (uint8 on 0..255, float data on its own range), each titled with
    its class: a grid of up to 8 columns."""
    x = images.transpose(0, 2, 3, 1)
    if x.shape[-1] == 1:
        x = x[..., 0]
    if images.dtype == np.uint8:
        limits = (0, 255)
    else:  # float data: one range for the whole grid, so that brightness compares across images
        x = _unit(x.astype(np.float64))
        limits = (0.0, 1.0)
    return _grid(x, min(8, len(x)), "gray", out, title, labels, limits)


def plot_feature_maps(maps: list[tuple[str, np.ndarray]], image: np.ndarray, out: Path | None) -> bytes | None:
    """The input image and, per conv layer, its output maps (C, H, W): one row per layer."""
    plt = pyplot()
    cols = min(8, max(m.shape[0] for _, m in maps))
    rows = len(maps) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image if image.ndim == 3 else image, cmap="gray", interpolation="nearest")
    axes[0, 0].set_title("input", fontsize=8)
    for r, (name, m) in enumerate(maps, start=1):
        for c in range(min(cols, m.shape[0])):
            axes[r, c].imshow(m[c], cmap="viridis", interpolation="nearest")
            axes[r, c].set_title(f"{name}:{c}", fontsize=7)
    return _save(fig, out)


def plot_lr_find(lrs: list[float], losses: list[float], suggested: float | None, out: Path | None,
                 title: str) -> bytes | None:
    """The range test's smoothed loss against the learning rate (log scale), the suggestion marked."""
    plt = pyplot("leave out --out: the verb prints the curve in the terminal")
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    if suggested is not None:
        ax.axvline(suggested, color="tab:red", linestyle="--", label=f"suggested {suggested:.2g}")
        ax.legend()
    ax.set_title(title)
    return _save(fig, out)


def plot_label_results(res: dict, out: Path | None, title: str) -> bytes | None:
    """Multi-label results: each label's precision, recall and average precision as grouped bars."""
    plt = pyplot()
    labels, k = res["classes"], len(res["classes"])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.6 * k), 3.5), layout="constrained")
    at = np.arange(k)
    for i, (key, name) in enumerate((("precision", "precision"), ("recall", "recall"),
                                     ("average_precision", "average precision"))):
        ax.bar(at + (i - 1) * 0.27, np.asarray(res[key]) * 100, 0.27, label=name)
    ax.set_xticks(at, labels, rotation=45, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return _save(fig, out)


def plot_confusion(cm: np.ndarray, classes: list[str], out: Path | None, title: str) -> bytes | None:
    plt = pyplot()
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * k, 0.8 + 0.5 * k))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    limit = cm.max() / 2 if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > limit else "black")
    ax.set_title(title)
    return _save(fig, out)


def text_chart(series: dict[str, list[float | None]], height: int = 10, width: int = 60,
               x_label: str = "epoch 1 .. {n}") -> str:
    """A chart in plain characters, `width` characters wide in all (the y axis's labels included): one marker
    per series, each series a line through its points (every column between two points takes the value between
    them), the y axis labelled with its range."""
    markers = "o*x+#@"
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    if not values:
        return "(no data)"
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-12
    n = max(len(vs) for vs in series.values())
    label_w = max(len(f"{hi:.4g}"), len(f"{lo:.4g}"))
    cols = max(width - label_w - 2, 2) if n > 1 else 2
    grid = [[" "] * cols for _ in range(height)]
    for m, vs in zip(markers, series.values()):
        for x in range(cols):
            t = x * (n - 1) / (cols - 1)
            i = min(int(t), n - 1)
            j = min(i + 1, len(vs) - 1)
            if i >= len(vs) or any(v is None or not math.isfinite(v) for v in (vs[i], vs[j])):
                continue
            v = vs[i] + (vs[j] - vs[i]) * (t - i)
            grid[height - 1 - round((v - lo) / (hi - lo) * (height - 1))][x] = m
    lines = []
    for r, row in enumerate(grid):
        label = f"{hi:.4g}" if r == 0 else f"{lo:.4g}" if r == height - 1 else ""
        lines.append(f"{label:>{label_w}} |{''.join(row)}")
    lines.append(" " * label_w + " +" + "-" * cols)
    legend = "  ".join(f"{m} {k}" for m, k in zip(markers, series))
    lines.append(" " * label_w + "  " + x_label.format(n=n) + "   " + legend)
    return "\n".join(lines)


def sweep_points(rows: list[dict]) -> dict[str, list[tuple[object, float]]]:
    """Per searched key, (value, best metric) of every trial with a metric (read_report's rows)."""
    points: dict[str, list[tuple[object, float]]] = {}
    for r in rows:
        if r["best"] is None:
            continue
        for key, value in r["values"].items():
            points.setdefault(key, []).append((value, r["best"]))
    return points


def _varied(points: dict) -> list[str]:
    """The searched keys whose trials used more than one value (else the first key)."""
    return [k for k, v in points.items() if len({repr(x) for x, _ in v}) > 1] or list(points)[:1]


def sweep_text(rows: list[dict], metric: str, width: int = 40) -> str:
    """The sweep in plain characters: per searched key, one bar per trial (sorted by value) as long as its
    metric, from the lowest to the highest of the sweep."""
    points = sweep_points(rows)
    keys = _varied(points)
    if not keys:
        raise CnnctlError("no finished trial to plot yet")
    values = [m for k in keys for _, m in points[k]]
    lo, hi = min(values), max(values)
    lines = []
    for key in keys:
        lines.append(f"{metric} against {key}")
        numeric = all(isinstance(x, (int, float)) for x, _ in points[key])
        shown = sorted(points[key], key=lambda p: p[0] if numeric else str(p[0]))
        label_w = max(len(str(x)) for x, _ in shown)
        for x, m in shown:
            n = 1 + round((m - lo) / (hi - lo) * (width - 1)) if hi > lo else width
            lines.append(f"  {str(x):>{label_w}} |{'#' * n} {m:.4f}")
    return "\n".join(lines)


def plot_trial_curves(histories: dict[str, list[dict]], metric: str, out: Path | None, title: str) -> bytes | None:
    """One line per trial: the metric after each epoch (validation epochs only, for val_ metrics)."""
    plt = pyplot(TERMINAL)
    fig, ax = plt.subplots(figsize=(7.5, 3.8), layout="constrained")
    for trial, rows in histories.items():
        points = [(r.get("epoch"), r.get(metric)) for r in rows if isinstance(r.get(metric), (int, float))]
        if points:
            ax.plot(*zip(*points), "-o", ms=3, label=trial)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if len(histories) <= 12:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, out)


def plot_sweep(rows: list[dict], metric: str, out: Path | None, title: str) -> bytes | None:
    """One panel per searched key: each trial's best metric against the value it used."""
    plt = pyplot(TERMINAL)
    points = sweep_points(rows)
    keys = _varied(points)
    if not keys:
        raise CnnctlError("no finished trial to plot yet")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False, layout="constrained")
    for ax, key in zip(axes[0], keys):
        xs, ys = zip(*points[key])
        numeric = all(isinstance(x, (int, float)) for x in xs)
        ax.scatter(xs if numeric else [str(x) for x in xs], ys)
        if numeric and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, out)


def plot_explanation(image01: np.ndarray, heat: np.ndarray, out: Path | None, title: str) -> bytes | None:
    """A picture (C, H, W) in 0..1 and its explanation map (H, W) side by side, the map also laid over the
    picture (the `inferno` colour map, 45% opaque); the colour bar says what its colours mean."""
    plt = pyplot()
    c = image01.shape[0]
    shown = image01[0] if c == 1 else np.clip(image01.transpose(1, 2, 0), 0, 1)
    fig, axes = plt.subplots(1, 2, figsize=(4.4, 2.5), layout="constrained")  # drawn at its size in the report
    for ax in axes:
        ax.imshow(shown, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_title("input", fontsize=9)
    im = axes[1].imshow(heat, cmap="inferno", alpha=0.45)
    axes[1].set_title("explanation", fontsize=9)
    fig.colorbar(im, ax=axes[1], shrink=0.8).ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, out)


def plot_reliability(confidence: np.ndarray, correct: np.ndarray, out: Path | None, title: str,
                     bins: int = 10) -> bytes | None:
    """The reliability diagram: per confidence bin, the accuracy (bars, numbered with their counts) against the
    diagonal of perfect calibration."""
    plt = pyplot()
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    acc = np.bincount(which, weights=correct, minlength=bins) / np.maximum(counts, 1)
    fig, ax = plt.subplots(figsize=(4.2, 3.8), layout="constrained")
    centres = (edges[:-1] + edges[1:]) / 2
    ax.bar(centres, acc, width=1 / bins, edgecolor="black", color="tab:blue", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="black", label="perfect calibration")
    for c, a, n in zip(centres, acc, counts):
        if n:
            ax.text(c, min(a + 0.02, 0.95), str(n), ha="center", fontsize=7)
    ax.set_xlabel("confidence (largest probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, out)
