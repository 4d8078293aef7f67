"""Dataset loaders on real-format files: generated IDX fixtures (gzip and raw), the shared MNIST when present."""

import gzip
import hashlib

import numpy as np
import pytest

from cnnctl.config import DataSpec
from cnnctl.data import batches, idx, load_dataset, shapes
from cnnctl.errors import DataError


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx_set(root, n_train=50, n_test=20, compress=True, seed=0):
    g = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = g.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = g.integers(0, 10, n, dtype=np.uint8)
        arrays[split] = (images, labels)
        for stem, arr in zip(idx.FILES[split], (images, labels)):
            data = idx_bytes(arr)
            if compress:
                (root / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (root / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    arrays = write_idx_set(tmp_path, compress=compress)
    for split in ("train", "test"):
        x, y = idx.load_split(tmp_path, split, "mnist")
        np.testing.assert_array_equal(x[:, 0], arrays[split][0])
        np.testing.assert_array_equal(y, arrays[split][1])
        assert x.dtype == np.uint8 and x.shape[1] == 1


@pytest.mark.parametrize("damage,words", [
    (lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(5))), ["magic"]),
    (lambda p: p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-100])), ["truncated"]),
    (lambda p: p.write_bytes(p.read_bytes()[:30]), ["decompress"]),
    (lambda p: p.unlink(), ["missing", "train-images-idx3-ubyte"]),
])
def test_idx_damaged_files(tmp_path, damage, words):
    write_idx_set(tmp_path)
    damage(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(DataError) as e:
        idx.load_split(tmp_path, "train", "mnist")
    for w in words:
        assert w in str(e.value)


def test_idx_count_mismatch_and_bad_labels(tmp_path):
    write_idx_set(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(49, np.uint8))))
    with pytest.raises(DataError, match="49 labels"):
        idx.load_split(tmp_path, "train", "mnist")
    labels.write_bytes(gzip.compress(idx_bytes(np.full(50, 12, np.uint8))))
    with pytest.raises(DataError, match="outside the 10 classes"):
        idx.load_split(tmp_path, "train", "mnist")


def test_val_split_is_deterministic_and_disjoint(tmp_path):
    write_idx_set(tmp_path, n_train=100)
    spec = DataSpec(dataset="mnist", root=str(tmp_path), val_split=0.2)
    a = load_dataset(spec, (1, 28, 28), np.random.default_rng(0))
    b = load_dataset(spec, (1, 28, 28), np.random.default_rng(0))
    assert len(a.train) == 80 and len(a.val) == 20 and len(a.test) == 20
    np.testing.assert_array_equal(a.val.x, b.val.x)
    train_rows = {r.tobytes() for r in a.train.x}
    assert not any(r.tobytes() in train_rows for r in a.val.x)
    c = load_dataset(spec, (1, 28, 28), np.random.default_rng(1))
    assert not np.array_equal(a.val.x, c.val.x)


def test_batches_are_normalised_float32(tmp_path):
    write_idx_set(tmp_path)
    ds = load_dataset(DataSpec(dataset="mnist", root=str(tmp_path), val_split=0.0), (1, 28, 28),
                      np.random.default_rng(0))
    x = np.concatenate([xb for xb, _ in batches(ds, ds.train, 16)])
    assert x.dtype == np.float32 and x.shape == (50, 1, 28, 28)
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-3
    assert ds.train.x.dtype == np.uint8


def test_shapes_are_reproducible_balanced_and_varied():
    kinds = ["circle", "square", "triangle", "cross", "ring", "bar"]
    x1, y1 = shapes.generate(600, kinds, (1, 24, 20), 0.1, np.random.default_rng(5))
    x2, y2 = shapes.generate(600, kinds, (1, 24, 20), 0.1, np.random.default_rng(5))
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.shape == (600, 1, 24, 20) and x1.dtype == np.uint8
    assert np.bincount(y1).tolist() == [100] * 6
    # positions vary: the centre of mass of the bright pixels spreads over the image
    bright = (x1[:, 0] > 128).astype(float)
    cy = (bright * np.arange(24)[:, None]).sum((1, 2)) / bright.sum((1, 2))
    assert cy.std() > 2
    rgb, _ = shapes.generate(10, kinds[:2], (3, 16, 16), 0.0, np.random.default_rng(0))
    assert rgb.shape == (10, 3, 16, 16)


def test_shared_mnist_loads_with_known_checksums_and_counts(mnist_root):
    x, y = idx.load_split(mnist_root, "test", "mnist")
    assert x.shape == (10000, 1, 28, 28)
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    raw = gzip.decompress((mnist_root / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert hashlib.sha256(raw).hexdigest() == "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
    xt, yt = idx.load_split(mnist_root, "train", "mnist")
    assert xt.shape == (60000, 1, 28, 28) and len(yt) == 60000


def write_cifar(root, n_per_batch=20, seed=0):
    g = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = g.integers(0, 10, n_per_batch, dtype=np.uint8)
        pixels = g.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
        out[name] = (labels, pixels)
    return out


def test_cifar10_binary_records(tmp_path):
    from cnnctl.data import cifar

    written = write_cifar(tmp_path)
    x, y = cifar.load_split(tmp_path, "train")
    assert x.shape == (100, 3, 32, 32) and y.shape == (100,)
    labels, pixels = written["data_batch_2.bin"]
    np.testing.assert_array_equal(y[20:40], labels)
    # channel planes: the first 1,024 bytes are red, row-major
    np.testing.assert_array_equal(x[20, 0].reshape(-1), pixels[0, :1024])
    np.testing.assert_array_equal(x[20, 2, 31, 31], pixels[0, 3071])
    xt, _ = cifar.load_split(tmp_path, "test")
    assert len(xt) == 20
    ds = load_dataset(DataSpec(dataset="cifar10", root=str(tmp_path)), (3, 32, 32), np.random.default_rng(0))
    assert ds.mean.shape == (3,) and ds.image_shape == (3, 32, 32)


def test_cifar10_damaged(tmp_path):
    from cnnctl.data import cifar

    write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-5])
    with pytest.raises(DataError, match="whole number"):
        cifar.load_split(tmp_path, "train")
    batch.unlink()
    with pytest.raises(DataError, match="missing data_batch_3.bin"):
        cifar.load_split(tmp_path, "train")
