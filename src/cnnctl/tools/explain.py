"""What a prediction looked at: saliency (Simonyan, Vedaldi and Zisserman 2014), Grad-CAM (Selvaraju et al. 2017)
and occlusion (Zeiler and Fergus 2014), computed with the model's own backward pass. All take normalised inputs
(N, C, H, W) and return one (N, H, W) map per input, for class `k` (default: the predicted class).

- saliency: max over channels of |d logit_k / d x|.
- Grad-CAM: ReLU(sum_c alpha_c A_c), A the output of a top-level layer (`layers.N`), alpha_c the spatial mean of
  d logit_k / d A_c; upsampled bilinearly (align_corners false) to the input's height and width.
- occlusion: p_k(x) - p_k(x with a patch x patch square set to 0, in normalised space), for every position of the
  square at `stride`; each pixel gets the mean over the squares that cover it.
"""

from __future__ import annotations

import numpy as np

from cnnctl.core.nn import Model
from cnnctl.core.plan import Runner
from cnnctl.errors import CnnctlError

METHODS = ("saliency", "gradcam", "occlusion")


def _classes(logits: np.ndarray, k) -> np.ndarray:
    """The class of each input: `k` (one for all, or one per input), else the predicted one."""
    n, classes = logits.shape
    if k is None:
        return logits.argmax(axis=1)
    ks = np.broadcast_to(np.asarray(k, np.int64), (n,))
    if (ks < 0).any() or (ks >= classes).any():
        raise CnnctlError(f"--class {k}: the model has classes 0..{classes - 1}", f"give a class 0..{classes - 1}")
    return ks


def _one_hot(ks: np.ndarray, classes: int, dtype) -> np.ndarray:
    dy = np.zeros((len(ks), classes), dtype)
    dy[np.arange(len(ks)), ks] = 1
    return dy


def _input_gradient(part: Model, x: np.ndarray, k) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, the classes, d logit_k / d x) of a top-level slice of a model, in inference mode."""
    part.set_input_grad(True)
    try:
        run = Runner(part)
        logits = np.array(run.forward(x, training=False), copy=True)
        ks = _classes(logits, k)
        dx = run.backward(_one_hot(ks, logits.shape[1], logits.dtype))
    finally:
        part.set_input_grad(False)
    return logits, ks, dx


def saliency(model: Model, x: np.ndarray, k=None) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, H, W), classes): max over channels of |d logit_k / d x|."""
    _, ks, dx = _input_gradient(model, x, k)
    return np.abs(dx).max(axis=1), ks


def spatial_layers(model: Model, input_shape) -> list[str]:
    """The top-level layers whose outputs are feature maps (C, H, W), in order: what Grad-CAM can look at."""
    shape, names = tuple(input_shape), []
    for i, layer in enumerate(model.layers):
        shape = layer.output_shape(shape)
        if len(shape) == 3:
            names.append(f"layers.{i}")
    return names


def gradcam(model: Model, x: np.ndarray, layer: str | None = None, k=None) -> tuple[np.ndarray, np.ndarray, str]:
    """(maps (N, H, W) at the input's size, classes, the layer used). `layer` is a top-level layer's state-dict
    prefix (layers.N); default: the last one whose output is spatial."""
    spatial = spatial_layers(model, x.shape[1:])
    if not spatial:
        raise CnnctlError("Grad-CAM needs a layer with spatial outputs; this model has none", "use --method saliency")
    layer = layer or spatial[-1]
    if layer not in spatial:
        raise CnnctlError(f"--layer {layer}: Grad-CAM takes a top-level layer whose output is feature maps",
                          f"one of: {', '.join(spatial)}")
    i = int(layer.split(".")[1])
    head, rest = Model(model.layers[: i + 1]), Model(model.layers[i + 1 :])
    try:
        a = np.array(Runner(head).forward(x, training=False), copy=True)  # (N, C, h, w)
        _, ks, da = _input_gradient(rest, a, k) if rest.layers else (None, None, None)
    finally:
        model.set_input_grad(False)  # the slices shared the model's layers: its own flags again
    if da is None:
        raise CnnctlError(f"--layer {layer} is the model's last layer; Grad-CAM needs the layers above it")
    alpha = da.mean(axis=(2, 3), keepdims=True)
    cam = np.maximum((alpha * a).sum(axis=1), 0)
    return upsample(cam, x.shape[2:]), ks, layer


def upsample(maps: np.ndarray, size) -> np.ndarray:
    """(N, h, w) maps resized bilinearly to (N, H, W), half-pixel centres (PyTorch's align_corners=False)."""
    n, h, w = maps.shape
    (hh, ww) = size

    def axis(out, inp):
        src = np.maximum((np.arange(out) + 0.5) * (inp / out) - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(np.int64), inp - 1)
        hi = np.minimum(lo + 1, inp - 1)
        return lo, hi, (src - lo).astype(maps.dtype)

    y0, y1, wy = axis(hh, h)
    x0, x1, wx = axis(ww, w)
    top = maps[:, y0][:, :, x0] * (1 - wx) + maps[:, y0][:, :, x1] * wx
    bottom = maps[:, y1][:, :, x0] * (1 - wx) + maps[:, y1][:, :, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def _probabilities(run: Runner, x: np.ndarray, takes: str) -> np.ndarray:
    """Class probabilities from the model's outputs, by what its loss takes (logits, log-probabilities, scores)."""
    from cnnctl.core.functional import probabilities

    return probabilities(run.forward(x, training=False), takes)


def occlusion(model: Model, x: np.ndarray, k=None, patch: int = 8, stride: int = 4, batch: int = 64,
              takes: str = "logits", progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, H, W), classes): the drop in p_k when a patch x patch square is set to 0, averaged over the
    squares covering each pixel; squares at every `stride` (the last one flush with the far edge). The loop is
    over the squares; each forward pass takes every input with several squares (about `batch` images).
    `progress(done, total)` is called with the squares done after each pass."""
    n, c, h, w = x.shape
    if patch < 1 or stride < 1 or patch > min(h, w):
        raise CnnctlError(f"--patch {patch} --stride {stride}: the square must fit the {h}x{w} input",
                          "use a patch no larger than the input and a stride of at least 1")
    run = Runner(model)  # one runner for every pass: its plans and buffers are made once per batch shape
    base = _probabilities(run, x, takes)
    ks = _classes(base, k)
    rows = np.arange(n)
    tops = sorted(set(range(0, h - patch + 1, stride)) | {h - patch})
    lefts = sorted(set(range(0, w - patch + 1, stride)) | {w - patch})
    squares = [(t, left) for t in tops for left in lefts]
    maps, cover = np.zeros((n, h, w), np.float64), np.zeros((h, w), np.float64)
    per_pass = max(1, batch // n)
    for s in range(0, len(squares), per_pass):
        part = squares[s : s + per_pass]
        copies = np.repeat(x[:, None], len(part), axis=1)  # (N, squares, C, H, W)
        for j, (t, left) in enumerate(part):
            copies[:, j, :, t : t + patch, left : left + patch] = 0
        probs = _probabilities(run, copies.reshape(n * len(part), c, h, w), takes).reshape(n, len(part), -1)
        drop = base[rows, ks][:, None] - probs[rows, :, ks]  # (N, squares)
        for j, (t, left) in enumerate(part):
            maps[:, t : t + patch, left : left + patch] += drop[:, j, None, None]
            cover[t : t + patch, left : left + patch] += 1
        if progress is not None:
            progress(s + len(part), len(squares))
    return (maps / cover).astype(np.float32), ks


def check_method(method: str) -> None:
    """Refuse a method name that is not one of METHODS, naming the choices."""
    if method not in METHODS:
        raise CnnctlError(f"--method {method!r}: use one of {', '.join(METHODS)}")


def explain(model: Model, x: np.ndarray, method: str, layer: str | None = None, k=None, patch: int = 8,
            stride: int = 4, takes: str = "logits", batch: int = 64, progress=None
            ) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(maps (N, H, W), classes explained, the layer Grad-CAM used) of one method on normalised inputs;
    `progress(done, total)` hears of occlusion's squares (the one method that takes many passes)."""
    check_method(method)
    if method == "saliency":
        return (*saliency(model, x, k), None)
    if method == "gradcam":
        return gradcam(model, x, layer, k)
    return (*occlusion(model, x, k, patch, stride, batch, takes, progress), None)


def picture_stems(names: list[str]) -> list[str]:
    """One file-name stem per input, no two alike (case aside, for case-insensitive file systems): the input's
    name with anything but letters, digits, - _ . replaced; names equal after that (x.png from two folders, or
    a:b and a_b) are numbered by their place among the inputs (2-x.png), so that no picture overwrites another."""
    plain = ["".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "input" for name in names]
    counts: dict[str, int] = {}
    for stem in plain:
        counts[stem.casefold()] = counts.get(stem.casefold(), 0) + 1
    used: set[str] = set()
    stems = []
    for i, stem in enumerate(plain):
        candidate = stem if counts[stem.casefold()] == 1 else f"{i + 1}-{stem}"
        while candidate.casefold() in used:
            candidate = f"{i + 1}-{candidate}"
        used.add(candidate.casefold())
        stems.append(candidate)
    return stems
