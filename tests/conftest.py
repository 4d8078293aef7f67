import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# every property test runs the same examples on every run (CI never flakes), with no deadline (a 2-core machine
# under load is slow); files set only max_examples
settings.register_profile("cnnctl", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("cnnctl")

ROOT = Path(__file__).resolve().parents[1]
MNIST = Path(os.environ.get("CNNCTL_TEST_MNIST", ROOT.parent / "shared" / "data" / "mnist"))
FASHION = Path(os.environ.get("CNNCTL_TEST_FASHION_MNIST", ROOT.parent / "shared" / "data" / "fashion-mnist"))

TINY = """\
name: tiny
seed: 3
data:
  dataset: shapes
  batch_size: 32
  val_split: 0.2
  shapes: {train_size: 300, test_size: 100}
model:
  input_shape: [1, 16, 16]
  layers:
    - {type: conv2d, filters: 4, kernel_size: 3, padding: same, activation: relu}
    - {type: maxpool2d, kernel_size: 2}
    - {type: flatten}
    - {type: dropout, rate: 0.1}
    - {type: dense, units: 4}
optimizer: {type: adam, lr: 0.01}
train: {epochs: 2}
"""


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The run directory of one epoch of TINY, trained once per test module (copy it before changing it)."""
    from tests.helpers import invoke

    tmp = tmp_path_factory.mktemp("tiny-run")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY.replace("epochs: 2", "epochs: 1"))
    invoke("train", cfg, "--runs-dir", tmp / "runs")
    return next((tmp / "runs").iterdir())


@pytest.fixture
def mnist_root() -> Path:
    if not (MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found at {MNIST}")
    return MNIST


@pytest.fixture
def fashion_root() -> Path:
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found at {FASHION}")
    return FASHION
