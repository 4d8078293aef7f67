"""int8 export: static post-training quantization of an exported ONNX model by onnxruntime's own quantizer (QDQ,
per-channel int8 weights, activations calibrated on images of the run's own training data), and an accuracy
gate: the float and the int8 model both evaluated in onnxruntime on the same split, the int8 file kept only when
it loses at most `max_drop` points of accuracy."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnctl.core.fileio import atomic_write_bytes
from cnnctl.errors import CnnctlError
from cnnctl.extras import require

EVAL_BATCH = 64  # images per onnxruntime run when the two models are measured


@dataclass
class Measured:
    accuracy: float  # on the split, 0..1
    images_per_second: float


def _ort():
    return require("onnxruntime", "int8", "export --int8 quantizes with onnxruntime, which is not installed")


def measure(path: Path, x01: np.ndarray, y: np.ndarray) -> Measured:
    """Accuracy and images/s of an ONNX classifier in onnxruntime (one thread per core, as it chooses) on pixels
    in 0..1."""
    ort = _ort()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct, t0 = 0, time.perf_counter()
    for lo in range(0, len(y), EVAL_BATCH):
        out = session.run(None, {"input": np.ascontiguousarray(x01[lo:lo + EVAL_BATCH], np.float32)})[0]
        correct += int((out.argmax(axis=1) == y[lo:lo + EVAL_BATCH]).sum())
    seconds = time.perf_counter() - t0
    return Measured(correct / max(len(y), 1), len(y) / max(seconds, 1e-9))


@contextlib.contextmanager
def _quiet_root_logger():
    """The quantizer's notes to the root logger (warnings about its own per-tensor fallback for 1-D weights, which
    a user cannot act on) left out while it runs; its errors still raise."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


def quantize(float_path: Path, out: Path, calibration01: np.ndarray, x01: np.ndarray, y: np.ndarray,
             max_drop: float = 1.0) -> tuple[Measured, Measured]:
    """Quantize the float model at float_path into `out` (written only when the gate passes) and measure both on
    (x01, y): (float, int8). A drop of more than max_drop points is a CnnctlError naming it, and nothing is
    written."""
    ort = _ort()
    quantization = require("onnxruntime.quantization", "int8", "export --int8 needs onnxruntime's quantizer")
    onnx = require("onnx", "onnx", "export --int8 needs the onnx package")
    if not len(calibration01):
        raise CnnctlError("--calibrate: no training images to calibrate the int8 activations on",
                          "give --calibrate 1 or more (e.g. --calibrate 256)")

    class Images(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": np.ascontiguousarray(calibration01[lo:lo + EVAL_BATCH], np.float32)}
                                 for lo in range(0, len(calibration01), EVAL_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        staged, prepared = Path(tmp) / "int8.onnx", Path(tmp) / "prepared.onnx"
        try:  # the quantizer's own preparation first (shapes inferred, the graph optimised), as it asks for
            from onnxruntime.quantization.shape_inference import quant_pre_process

            # symbolic shape inference (sympy) is for graphs with symbolic sizes; an export has only the batch
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
            with _quiet_root_logger():  # "Axis 1 is out-of-range for weight ...": its per-tensor fallback, not ours
                quantization.quantize_static(str(prepared), str(staged), Images(),
                                             quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                             activation_type=quantization.QuantType.QInt8,
                                             weight_type=quantization.QuantType.QInt8)
        except Exception as e:  # the quantizer's own errors (an operator it cannot take, say)
            raise CnnctlError(f"onnxruntime {ort.__version__} could not quantize {float_path} "
                              f"({type(e).__name__}: {e})", "export without --int8") from None
        model = onnx.load(str(staged))
        kept = {p.key for p in model.metadata_props}
        for p in onnx.load(str(float_path)).metadata_props:  # class names and normalisation travel with it
            if p.key not in kept:
                entry = model.metadata_props.add()
                entry.key, entry.value = p.key, p.value
        entry = model.metadata_props.add()
        entry.key, entry.value = "quantization", "int8 (onnxruntime quantize_static, QDQ, per-channel weights)"
        staged.write_bytes(model.SerializeToString())
        before, after = measure(float_path, x01, y), measure(staged, x01, y)
        drop = 100 * (before.accuracy - after.accuracy)
        if drop > max_drop:
            raise CnnctlError(f"the int8 model loses {drop:.2f} points of accuracy ({100 * before.accuracy:.2f}% -> "
                              f"{100 * after.accuracy:.2f}% on {len(y):,} images), more than --max-drop "
                              f"{max_drop:g}; {out} was not written",
                              "calibrate on more images (--calibrate), allow a larger drop (--max-drop), or keep "
                              "the float model")
        atomic_write_bytes(Path(out), staged.read_bytes())
    return before, after


def int8_path(float_path: Path) -> Path:
    """Where the int8 model goes beside the float one: model.onnx -> model-int8.onnx."""
    p = Path(float_path)
    return p.with_name(f"{p.stem}-int8{p.suffix or '.onnx'}") if p.name != os.devnull else p


def check_options(calibrate: int, max_drop: float) -> None:
    """--calibrate and --max-drop, before anything is exported."""
    if calibrate < 1:
        raise CnnctlError(f"--calibrate {calibrate}: the activations need images to be calibrated on",
                          "give --calibrate 1 or more (e.g. --calibrate 256)")
    if not max_drop >= 0:  # NaN too
        raise CnnctlError(f"--max-drop {max_drop}: the accuracy the int8 model may lose is 0 points or more",
                          "e.g. --max-drop 1.0")


def quantize_run(spec, rows, normalization: dict, float_path: Path, out: Path, calibrate: int = 256,
                 max_drop: float = 1.0) -> tuple[Measured, Measured, str, int, int]:
    """`cnnctl export --int8`: the run's own data as its run saw it, `calibrate` of its training images (drawn with
    the run's seed) for the activations' ranges, its test split (else validation) for the gate. Returns (float,
    int8, the split's name, its images, the images calibrated on)."""
    from cnnctl.run.start import run_data

    check_options(calibrate, max_drop)
    ds = run_data(spec, rows, normalization)
    name = "test" if len(ds.test) else "val"
    split = ds.split(name)
    if not len(split):
        raise CnnctlError(f"the {spec.data.dataset} data has no test or validation images to measure the int8 model "
                          "on", "give the run's data a test split, or export without --int8")
    scale = np.float32(1 / ds.pixel_scale)
    pick = np.sort(np.random.default_rng(spec.seed).choice(len(ds.train), min(calibrate, len(ds.train)),
                                                           replace=False))
    before, after = quantize(float_path, out, ds.train.x[pick].astype(np.float32) * scale,
                             split.x.astype(np.float32) * scale, split.y, max_drop)
    return before, after, name, len(split), len(pick)
