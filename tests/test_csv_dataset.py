"""dataset: csv: a list of pictures with their labels (and splits) trains, evaluates and predicts; every bad row
is named in one message."""

import json

import numpy as np
import pytest
import yaml

import cnnctl
from tests.conftest import TINY
from tests.helpers import invoke
from tests.test_errors import expect_error

Image = pytest.importorskip("PIL.Image")


def _pictures(tmp_path, with_splits=True, names=True):
    g = np.random.default_rng(0)
    (tmp_path / "pics").mkdir()
    lines = ["path,label" + (",split" if with_splits else "")]
    for i in range(40):
        k = i % 2
        Image.fromarray((g.random((20, 20)) * 100 + 120 * k).astype(np.uint8)).save(tmp_path / "pics" / f"{i}.png")
        split = "test" if i >= 32 else "val" if i >= 26 else "train"
        label = ("dark", "light")[k] if names else str(k)
        lines.append(f"pics/{i}.png,{label}" + (f",{split}" if with_splits else ""))
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    spec = yaml.safe_load(TINY)
    spec["data"] = {"dataset": "csv", "path": str(tmp_path / "labels.csv"), "batch_size": 8}
    spec["model"]["layers"][-1]["units"] = 2
    spec["train"]["test_at_end"] = True
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "c.yaml"


def test_a_csv_of_pictures_trains_evaluates_and_predicts(tmp_path):
    cfg = _pictures(tmp_path)
    info = json.loads(invoke("data", cfg, "--json").output)
    assert info["classes"] == ["dark", "light"] and [info["splits"][s]["total"] for s in ("train", "val", "test")] \
        == [26, 6, 8]  # the CSV's own validation rows, val_split unused
    run = cnnctl.train(cfg, runs_dir=tmp_path / "runs")
    assert run.summary["test"]["n"] == 8
    report = cnnctl.evaluate(run.dir)
    assert report["classes"] == ["dark", "light"] and report["n"] == 8
    res = json.loads(invoke("predict", run.dir, tmp_path / "pics" / "0.png", "--json").stdout)
    assert res[0]["top"][0]["class"] in ("dark", "light")


def test_integer_labels_and_no_split_column(tmp_path):
    cfg = _pictures(tmp_path, with_splits=False, names=False)
    info = json.loads(invoke("data", cfg, "--json").output)
    assert info["classes"] == ["0", "1"] and info["splits"]["train"]["total"] == 36  # val_split 0.2 of 40, no test


def test_every_bad_row_is_named_in_one_message(tmp_path):
    cfg = _pictures(tmp_path)
    text = (tmp_path / "labels.csv").read_text().splitlines()
    text[3] = "pics/missing.png,dark,train"
    text[5] = "pics/4.png,dark,holdout"
    text[7] = ",dark,train"
    (tmp_path / "labels.csv").write_text("\n".join(text) + "\n")
    (tmp_path / "pics" / "10.png").write_bytes(b"not a picture")
    msg = expect_error(["data", cfg], "3 rows cannot be used", "line 4:", "missing.png does not exist",
                       "line 6: split 'holdout' is not train, val or test", "line 8: an empty path or label")
    assert "10.png" not in msg  # the rows first; once they are fixed, the pictures
    (tmp_path / "labels.csv").write_text("\n".join(line for i, line in enumerate(text) if i not in (3, 5, 7)) + "\n")
    expect_error(["data", cfg], "10.png", "cannot be decoded")
    (tmp_path / "labels.csv").write_text("file,class\na.png,x\n")
    expect_error(["data", cfg], "needs the columns path and label")
    expect_error(["inspect", cfg, "--set", "data.path=null"], "dataset: csv reads the CSV given as data.path")


@pytest.mark.parametrize("line, words", [
    ("pics/1.png,dark,train,extra", ["line 3: 4 fields, the header has 3"]),
    ("pics/1.png," + "x" * 200_000 + ",train", ["line 3:", "field larger than field limit"]),
    ("pics/1.png,\u00b2,train", ["line 3: label '\u00b2' is written with digits other than 0-9"]),
    ("pics/1.png,\u0663,train", ["line 3: label '\u0663'"]),
    ("pics/1.png," + "y" * 5000 + ",train", ["line 3: a label of 5,000 characters"]),
    ("pics/1.png", ["line 3: 1 fields, the header has 3"]),
], ids=["extra-field", "huge-field", "superscript-digit", "arabic-indic-digit", "long-label", "short-row"])
def test_malformed_rows_are_named_by_line(tmp_path, line, words):
    cfg = _pictures(tmp_path)
    text = (tmp_path / "labels.csv").read_text().splitlines()
    text[2] = line
    (tmp_path / "labels.csv").write_text("\n".join(text) + "\n")
    expect_error(["data", cfg], *words)


def test_an_integer_label_beyond_the_data_is_refused_before_any_class_list(tmp_path, monkeypatch):
    cfg = _pictures(tmp_path, with_splits=False, names=False)
    text = (tmp_path / "labels.csv").read_text().splitlines()
    text[4] = "pics/3.png,9999999999"
    (tmp_path / "labels.csv").write_text("\n".join(text) + "\n")
    expect_error(["data", cfg], "line 5: label 9999999999 is beyond the data", "40 rows")
    text[4] = "pics/3.png,7"  # classes left out are fine: 0..7, six of them without pictures
    (tmp_path / "labels.csv").write_text("\n".join(text) + "\n")
    spec = yaml.safe_load(cfg.read_text())
    spec["model"]["layers"][-1]["units"] = 8
    cfg.write_text(yaml.safe_dump(spec))
    info = json.loads(invoke("data", cfg, "--json").output)
    assert info["classes"] == [str(i) for i in range(8)]
