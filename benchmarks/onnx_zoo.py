"""The ONNX model zoo's classic classifiers (the `onnx` package's onnx/backend/test/data/light/ files) and
torchvision's ShuffleNetV2 x0.5, ConvNeXt-tiny and DenseNet-121 as torch.onnx.export writes them
(tests/data/torchvision/), weights made seeded random tensors as tests/test_onnx_zoo.py and
tests/test_onnx_torchvision.py make them: per file, the import's wall time (`cnnctl import`'s work: read, check,
fold, rewrite, walk, build and load the model) and the largest difference of the class scores from onnxruntime's,
relative to the largest score. Prints a Markdown table.

    python benchmarks/onnx_zoo.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from cnnctl.core.environment import blas_info, cpu_model  # noqa: E402
from cnnctl.interop import onnx_import  # noqa: E402
from tests import test_onnx_torchvision, test_onnx_zoo  # noqa: E402


def main() -> None:
    print(f"`python benchmarks/onnx_zoo.py`, {time.strftime('%Y-%m-%d')}, {cpu_model()}, {blas_info()}\n")
    print("| file | from | parameters | import (s) | max difference / max score |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for zoo, name in [*((True, n) for n in test_onnx_zoo.IMPORTED),
                          *((False, n) for n in test_onnx_torchvision.NETWORKS)]:
            if zoo:
                path, input_name, shape = test_onnx_zoo.materialize(name, Path(tmp) / f"{name}.onnx")
                source = "model zoo (Caffe2, opset 9)"
            else:
                path = test_onnx_torchvision.materialize(name, Path(tmp) / f"{name}.onnx")
                input_name, shape, source = "input", (1, 3, 224, 224), "torchvision (torch.onnx, opset 17)"
            t0 = time.perf_counter()
            _, _, model, _, _, _, _ = onnx_import.build(path, name, None, None, None)
            seconds = time.perf_counter() - t0
            x = np.random.default_rng(1).random(shape, dtype=np.float32)
            ref = ort.InferenceSession(str(path)).run(None, {input_name: x})[0].reshape(1, -1)
            got = model.forward(x, training=False)
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            print(f"| {name} | {source} | {model.num_params():,} | {seconds:.2f} | {err:.1e} |")
            path.unlink()

if __name__ == "__main__":
    main()
