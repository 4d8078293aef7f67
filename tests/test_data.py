"""Dataset loaders on real-format files: generated IDX fixtures (gzip and raw), the shared MNIST when present."""

import gzip
import hashlib
import json

import numpy as np
import pytest
import yaml

from cnnctl.data import batches, idx, load_dataset, shapes
from cnnctl.data.spec import DataSpec
from cnnctl.errors import DataError
from tests.conftest import ROOT
from tests.helpers import invoke


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


def test_hostile_idx_headers_are_refused_without_inflating(tmp_path, monkeypatch):
    """A small gzip that inflates far past its header's shape is refused after reading one byte more than the
    shape needs; a header whose dimensions multiply past any data set is refused before reading the body."""
    import struct

    bomb = tmp_path / "bomb.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">III", 1, 28, 28))
        for _ in range(64):
            f.write(bytes(4 << 20))  # 256 MB of zeros after the one image the header announces
    assert bomb.stat().st_size < 1 << 20
    inflated = []
    real_open = gzip.open

    def counting_open(*args, **kwargs):  # every read's inflated bytes, counted
        f = real_open(*args, **kwargs)
        read = f.read
        f.read = lambda *a: inflated.append(len(out := read(*a))) or out
        return f

    monkeypatch.setattr(gzip, "open", counting_open)
    with pytest.raises(DataError, match="holds more"):
        idx.read(bomb, 3)
    assert 0 < sum(inflated) < 1 << 20  # the header and one image, not 256 MB
    huge = tmp_path / "huge"
    huge.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 2**31, 2**31, 4))
    with pytest.raises(DataError, match="more than any IDX data set"):
        idx.read(huge, 3)


def test_hostile_user_files_are_data_errors(tmp_path):
    import os
    import struct
    import zlib

    from cnnctl.data import cifar, folder, npz

    (tmp_path / "cifar" / "cifar-10-batches-bin" / "data_batch_1.bin").mkdir(parents=True)
    with pytest.raises(DataError, match="cannot read"):
        cifar.read_batch(tmp_path / "cifar" / "cifar-10-batches-bin" / "data_batch_1.bin")
    good = tmp_path / "good.npz"
    x, y = np.zeros((2, 4, 4), np.uint8), np.array([0, 1])
    np.savez(good, x_train=x, y_train=y, x_test=x, y_test=y)
    (tmp_path / "torn.npz").write_bytes(good.read_bytes()[:200])
    np.save(tmp_path / "plain.npy", x)
    os.rename(tmp_path / "plain.npy", tmp_path / "renamed.npz")
    np.savez(tmp_path / "wrap.npz", x_train=x, y_train=np.array([0, 2**64 - 1], np.uint64), x_test=x, y_test=y)
    for name, words in [("torn.npz", "cannot read"), ("renamed.npz", "single .npy array"), ("wrap.npz", "label")]:
        with pytest.raises(DataError, match=words):
            npz.load_npz(tmp_path / name)
    pytest.importorskip("PIL")
    root = tmp_path / "folder"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
    os.mkfifo(root / "train" / "a" / "pipe.png")  # would block forever if opened

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")
    (root / "test" / "a" / "bomb.png").write_bytes(png)
    with pytest.raises(DataError) as e:
        folder.load_folder(root, (1, 8, 8))
    assert "bomb.png" in str(e.value) or "holds no images" in str(e.value)




def test_a_hyphenated_dataset_folder_under_cnnctl_data_is_found(tmp_path, monkeypatch, fashion_root):
    (tmp_path / "fashion-mnist").symlink_to(fashion_root)
    monkeypatch.setenv("CNNCTL_DATA", str(tmp_path))
    spec = yaml.safe_load((ROOT / "configs" / "lenet5-mnist.yaml").read_text())
    spec["data"]["dataset"] = "fashion_mnist"
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(spec))
    info = json.loads(invoke("data", tmp_path / "f.yaml", "--json").stdout)
    assert info["splits"]["test"]["total"] == 10_000


def test_the_default_dataset_folder_takes_the_hyphenated_name(tmp_path, monkeypatch):
    from cnnctl.data import default_root

    monkeypatch.setenv("CNNCTL_DATA", str(tmp_path))
    assert default_root("fashion_mnist") == tmp_path / "fashion_mnist"
    (tmp_path / "fashion-mnist").mkdir()
    assert default_root("fashion_mnist") == tmp_path / "fashion-mnist"
    (tmp_path / "fashion_mnist").mkdir()
    assert default_root("fashion_mnist") == tmp_path / "fashion_mnist"
