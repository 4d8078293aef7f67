"""Multi-label classification (task: multilabel, loss: bce_with_logits): a CSV of generated pictures with a|b|c
labels trains to a measured mAP; eval, predict --threshold, report, export and data show per-label results; the
metrics equal scikit-learn's; configs that cannot work are refused with the key to change."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.helpers import invoke
from tests.test_errors import expect_error

LABELS = ("across", "down", "spot")


def lines_data(root, n: int = 600, seed: int = 0):
    """16x16 grey pictures, each with any of a horizontal line (across), a vertical line (down) and a square
    (spot), at random places over noise; labels.csv lists them as a|b|c, the last fifth the test split."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,split"]
    for i in range(n):
        img = rng.normal(40, 20, (16, 16))
        names = [name for name in LABELS if rng.random() < 0.45]
        if "across" in names:
            img[rng.integers(1, 15), 1:15] = 230
        if "down" in names:
            img[1:15, rng.integers(1, 15)] = 230
        if "spot" in names:
            r, c = rng.integers(2, 12, 2)
            img[r : r + 3, c : c + 3] = 200
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{'|'.join(names)},{'test' if i >= 0.8 * n else 'train'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


CONFIG = {
    "name": "lines", "seed": 0, "task": "multilabel",
    "data": {"dataset": "csv", "path": "data/labels.csv", "batch_size": 32, "val_split": 0.15},
    "model": {"input_shape": [1, 16, 16], "layers": [
        {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": "same", "activation": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same", "activation": "relu"},
        {"type": "global_avgpool2d"},
        {"type": "dense", "units": 3}]},
    "loss": {"type": "bce_with_logits"},
    "optimizer": {"type": "adam", "lr": 0.01},
    "train": {"epochs": 10, "monitor": "val_loss"},
}


@pytest.fixture(scope="module")
def lines_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multilabel")
    lines_data(folder / "data")
    (folder / "lines.yaml").write_text(yaml.safe_dump(CONFIG))
    res = invoke("train", folder / "lines.yaml", "--runs-dir", folder / "runs", "--quiet")
    assert res.exit_code == 0, res.output
    (run,) = (folder / "runs").iterdir()
    return folder, run


def test_multilabel_trains_to_a_measured_map_and_eval_gives_per_label_results(lines_run):
    folder, run = lines_run
    res = invoke("eval", run, "--json", "--plot", folder / "labels.png")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["task"] == "multilabel" and out["classes"] == list(LABELS) and out["n"] == 120
    assert out["map"] > 0.95, out["map"]  # 0.99 measured (adam 0.01, 10 epochs, 408 training images)
    assert out["micro_f1"] > 0.9 and out["macro_f1"] > 0.9 and 0.8 < out["accuracy"] <= 1
    assert len(out["average_precision"]) == len(out["precision"]) == len(out["recall"]) == 3
    assert "confusion_matrix" not in out and (folder / "labels.png").stat().st_size > 1000
    text = invoke("eval", run).stdout
    assert "mAP" in text and "per label" in text and "average precision" in text and "confusion" not in text


def test_predict_lists_every_label_over_the_threshold_and_judges_a_labelled_csv(lines_run):
    folder, run = lines_run
    res = invoke("predict", run, folder / "data" / "labels.csv", "--out", folder / "p.csv")
    assert res.exit_code == 0, res.output
    rows = (folder / "p.csv").read_text().splitlines()
    assert rows[0].startswith("input,prediction,class_1,probability_1") and rows[0].endswith("label,correct")
    assert len(rows) == 601 and "right of 600 with a true class" in res.stdout  # an empty label is judged too
    res = invoke("predict", run, folder / "data" / "0.png", "--json")
    (one,) = json.loads(res.stdout)
    probs = {t["class"]: t["probability"] for t in one["top"]}
    assert one["labels"] == [c for c in sorted(probs, key=probs.get, reverse=True) if probs[c] >= 0.5]
    (everything,) = json.loads(invoke("predict", run, folder / "data" / "0.png", "--json", "--threshold", "0").stdout)
    assert sorted(everything["labels"]) == sorted(LABELS)
    expect_error(["predict", run, folder / "data" / "0.png", "--threshold", "1.5"], "--threshold 1.5")


def test_report_export_and_data_show_labels(lines_run, tmp_path):
    folder, run = lines_run
    assert invoke("report", run, "--out", tmp_path / "r.html").exit_code == 0
    page = (tmp_path / "r.html").read_text()
    assert "several labels each: mAP" in page and "Per label" in page and "Confusion matrix" not in page
    res = invoke("export", run, "--out", tmp_path / "m.onnx", "--softmax")
    assert res.exit_code == 0 and "checked against onnxruntime" in res.output, res.output
    import onnx

    assert onnx.load(str(tmp_path / "m.onnx")).graph.node[-2].op_type == "Sigmoid"
    expect_error(["export", run, "--out", tmp_path / "q.onnx", "--int8"], "multi-label")
    counts = json.loads(invoke("data", run, "--json").stdout)
    test = counts["splits"]["test"]
    assert counts["classes"] == list(LABELS) and sum(test["per_class"]) > test["total"] / 2  # labels per image


def test_label_metrics_equal_scikit_learns():
    metrics = pytest.importorskip("sklearn.metrics")
    from cnnctl.run.evaluation import label_metrics

    rng = np.random.default_rng(3)
    y = (rng.random((300, 5)) < 0.3).astype(np.uint8)
    y[:, 4] = 0  # a label no image has: left out of mAP, as scikit-learn would warn
    logits = rng.normal(size=(300, 5)) + 1.5 * y
    logits[:40, 0] = np.round(logits[:40, 0])  # tied scores
    m = label_metrics(logits, y)
    said = logits > 0
    assert m["map"] == pytest.approx(np.mean([metrics.average_precision_score(y[:, j], logits[:, j])
                                              for j in range(4)]))
    assert m["micro_f1"] == pytest.approx(metrics.f1_score(y, said, average="micro"))
    assert m["macro_f1"] == pytest.approx(metrics.f1_score(y, said, average="macro", zero_division=0))
    assert m["accuracy"] == pytest.approx(metrics.accuracy_score(y, said))
    np.testing.assert_allclose(m["recall"], metrics.recall_score(y, said, average=None, zero_division=0))


def test_average_precision_by_hand():
    from cnnctl.run.evaluation import average_precision

    # ranked: +, -, +, -: precision 1 at the first positive, 2/3 at the second -> (1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    assert average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)  # a tie: one threshold
    assert average_precision(np.array([0.3, 0.2]), np.array([0, 0])) == 0.0


def test_pos_weight_auto_is_negatives_over_positives():
    from cnnctl.config.build import build_loss
    from cnnctl.config.reading import validate

    spec = validate({**CONFIG, "loss": {"type": "bce_with_logits", "pos_weight": "auto"}})
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]], np.uint8)
    np.testing.assert_allclose(build_loss(spec, y, 3).pos_weight, [1 / 3, 3.0, 1.0])


@pytest.mark.parametrize("change, words", [
    ({"loss": {"type": "cross_entropy"}}, "task is multilabel but loss is cross_entropy"),
    ({"data": {"dataset": "mnist"}}, "that lists them (dataset: folder, csv)"),
    ({"data": {"dataset": "csv", "path": "x.csv", "stratify": True}}, "data.stratify"),
    ({"loss": {"type": "cross_entropy", "pos_weight": [1.0]}, "task": "classification"}, "pos_weight applies"),
])
def test_configs_that_cannot_work_are_refused(tmp_path, change, words):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**CONFIG, **change}))
    expect_error(["inspect", tmp_path / "c.yaml"], words)


def test_a_sigmoid_before_the_loss_and_empty_labels_are_refused(tmp_path):
    layers = [*CONFIG["model"]["layers"][:-1], {"type": "dense", "units": 3, "activation": "sigmoid"}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**CONFIG, "model": {**CONFIG["model"], "layers": layers}}))
    expect_error(["inspect", tmp_path / "c.yaml"], "applies a sigmoid", "remove sigmoid")
    lines_data(tmp_path / "data", n=10)
    text = (tmp_path / "data" / "labels.csv").read_text().splitlines()
    text[3] = "2.png,across||spot,train"
    (tmp_path / "data" / "labels.csv").write_text("\n".join(text) + "\n")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    expect_error(["data", tmp_path / "c.yaml"], "line 4: an empty label between '|'s")


def test_a_folder_of_label_folders_gives_each_picture_every_label_it_is_filed_under(tmp_path):
    """dataset: folder, multi-label: the same picture (a copy or a link) under several label folders has all of
    their labels; the same name on two different pictures is refused; and a pack refuses multi-label data."""
    import os
    import shutil

    from cnnctl.data.folder import list_folder

    csv = lines_data(tmp_path / "flat", n=12)
    rows = [line.split(",") for line in csv.read_text().splitlines()[1:]]
    for name, labels, split in rows:
        for label in filter(None, labels.split("|")):
            folder = tmp_path / "tree" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            if label == "spot":  # a link for one label, copies for the others
                os.symlink(tmp_path / "flat" / name, folder / name)
            else:
                shutil.copy(tmp_path / "flat" / name, folder / name)
    listing = list_folder(tmp_path / "tree", (1, 16, 16), multilabel=True)
    assert listing.classes == list(LABELS)
    files, y = listing.splits["train"]
    want = {name: labels for name, labels, split in rows if split == "train" and labels}
    assert sorted(f.name for f in files) == sorted(want)
    for f, row in zip(files, y):
        assert [LABELS[j] for j in np.flatnonzero(row)] == sorted(want[f.name].split("|"))
    config = {**CONFIG, "data": {"dataset": "folder", "root": str(tmp_path / "tree"), "val_split": 0.0},
              "train": {"epochs": 1, "monitor": "train_loss"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    counts = json.loads(invoke("data", tmp_path / "c.yaml", "--json").stdout)
    assert counts["splits"]["train"]["per_class"] == y.sum(axis=0).tolist()
    expect_error(["pack", tmp_path / "c.yaml", "--out", tmp_path / "pack"], "multi-label")
    first = next(iter((tmp_path / "tree" / "train" / "across").iterdir()))
    other = tmp_path / "tree" / "train" / "down" / first.name
    other.unlink(missing_ok=True)
    other.write_bytes(b"not the same picture")
    expect_error(["data", tmp_path / "c.yaml"], "share a name but are different pictures")


def test_serve_lists_the_labels_over_the_threshold_from_a_checkpoint_and_its_export(lines_run, tmp_path):
    """cnnctl serve on loopback (a real HTTP client): a multi-label run's /predict gives `labels` as predict
    --json does, at ?threshold= too; its .onnx export (Sigmoid-free logits, task in the metadata) the same."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from tests.test_serve import Server

    folder, run = lines_run
    picture = folder / "data" / "0.png"
    (want,) = json.loads(invoke("predict", run, picture, "--json").stdout)
    invoke("export", run, "--out", tmp_path / "m.onnx")
    for target in (run, tmp_path / "m.onnx"):
        s = Server(target)
        try:
            files = [("files", (picture.name, picture.read_bytes(), "image/png"))]
            (got,) = httpx.post(f"{s.url}/predict", files=files).json()
            assert got["labels"] == want["labels"] and got["prediction"] == want["prediction"], target
            (every,) = httpx.post(f"{s.url}/predict?threshold=0", files=files).json()
            assert sorted(every["labels"]) == sorted(LABELS)
        finally:
            s.stop()


def test_a_label_matrix_too_large_is_refused_before_it_is_made(tmp_path, monkeypatch):
    from cnnctl.data import csvfile

    csv = lines_data(tmp_path / "data", n=10)
    rows = csv.read_text().splitlines()
    rows[1:] = [f"{r.split(',')[0]},{'|'.join(f'tag{i}-{j}' for j in range(50))},train" for i, r in enumerate(rows[1:])]
    csv.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(csvfile, "MAX_LABEL_BYTES", 10 * 499)
    with pytest.raises(Exception, match="10 pictures and 500 different labels"):
        csvfile.list_csv(csv, (1, 16, 16), multilabel=True)
