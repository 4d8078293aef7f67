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


@pytest.fixture
def threads(monkeypatch):
    """Set cnnctl's thread count (and, with grain=, the slice size); back to one thread after the test."""
    from cnnctl.core import parallel

    def use(n, grain=None):
        if grain is not None:
            monkeypatch.setattr(parallel, "GRAIN", grain)
        parallel.use(n)

    yield use
    parallel.use(1)


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


# The real-data runs, each trained once per session and shared by the tests that read them (copy before changing)

@pytest.fixture(scope="session")
def lenet5_mnist_run(tmp_path_factory) -> Path:
    """configs/lenet5-mnist.yaml as shipped (its full schedule) on the real MNIST."""
    from tests.helpers import invoke

    if not (MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found at {MNIST}")
    runs = tmp_path_factory.mktemp("lenet5-mnist")
    invoke("train", ROOT / "configs" / "lenet5-mnist.yaml", "--runs-dir", runs, "--set", f"data.root={MNIST}",
           "--quiet")
    (run,) = runs.iterdir()
    return run


FASHION_SHORT = ["train.epochs=2", "optimizer.lr=0.2", "data.augment.random_crop=0",
                 "data.augment.horizontal_flip=false", "data.test_time_augment.horizontal_flip=false",
                 "data.test_time_augment.shifts=[]"]


@pytest.fixture(scope="session")
def resnet_fashion_run(tmp_path_factory) -> Path:
    """configs/resnet-fashion-fast.yaml (residual blocks from YAML) shortened to 2 epochs of its one-cycle schedule,
    with the settings a short run wants (FASHION_SHORT: peak rate 0.2, no augmentation, so no test-time views
    either: a network that never saw shifted or mirrored images is hurt by them), on the real Fashion-MNIST."""
    from tests.helpers import invoke

    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found at {FASHION}")
    runs = tmp_path_factory.mktemp("resnet-fashion")
    invoke("train", ROOT / "configs" / "resnet-fashion-fast.yaml", "--runs-dir", runs, "--set",
           f"data.root={FASHION}", *(a for o in FASHION_SHORT for a in ("--set", o)), "--quiet")
    (run,) = runs.iterdir()
    return run
