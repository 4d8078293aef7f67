"""Picture files (data/pictures.py, data/folder.py, predict): 16-bit PNGs, only documented formats decoded,
every bad file named, fuzzed images, and the images extra missing."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.helpers import invoke
from tests.test_errors import expect_error


def _png16(path, value):
    from PIL import Image

    Image.fromarray(np.full((6, 6), value, np.uint16)).save(path)  # mode I;16: a 16-bit grayscale PNG


def _damaged_png(path, length=0):
    """A PNG whose IDAT chunk length is damaged (Pillow raises SyntaxError), or with length=5 its IHDR's
    (ValueError)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    at = 33 if length == 0 else 8  # the IDAT length field follows the 25-byte IHDR chunk
    raw[at : at + 4] = length.to_bytes(4, "big")
    path.write_bytes(bytes(raw))


def _png_bytes(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 5), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PICTURES = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.integers(0, 5), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
              st.integers(0, 400)).map(lambda t: bytes(
                  b if i not in dict(t[1]) else dict(t[1])[i] for i, b in enumerate(_png_bytes(t[0])))[: t[2] or None]),
)


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_pngs_keep_their_brightness(tmp_path, channels):
    pytest.importorskip("PIL")
    from cnnctl.data import pictures

    for value, expected in ((0, 0), (16448, 64), (32896, 128), (65535, 255)):
        _png16(tmp_path / "x.png", value)
        np.testing.assert_array_equal(pictures.decode_image(tmp_path / "x.png", (channels, 4, 4)),
                                      np.full((channels, 4, 4), expected, np.uint8))


def test_two_brightness_classes_of_16_bit_pngs_stay_apart_in_a_folder(tmp_path):
    pytest.importorskip("PIL")
    from cnnctl.data import folder

    for split in ("train", "test"):
        for cls, value in (("dark", 12000), ("bright", 50000)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                _png16(tmp_path / split / cls / f"{i}.png", value + i)
    classes, (x, y), _ = folder.load_folder(tmp_path, (1, 6, 6))
    means = {classes[k]: x[y == k].mean() for k in range(2)}
    assert abs(means["dark"] - 12000 / 257) < 1 and abs(means["bright"] - 50000 / 257) < 1


def test_only_documented_formats_are_decoded_whatever_the_name(tmp_path, monkeypatch):
    """A PostScript file named .png must never reach Pillow's EPS plugin (which runs Ghostscript)."""
    PIL = pytest.importorskip("PIL")
    from PIL import EpsImagePlugin

    from cnnctl.data import pictures

    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a))
    monkeypatch.setattr(EpsImagePlugin, "gs_windows_binary", "/bin/false", raising=False)
    (tmp_path / "x.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n")
    with pytest.raises(ValueError, match="not a picture in one of the formats"):
        pictures.decode_image(tmp_path / "x.png", (1, 8, 8))
    assert not called and PIL


def png_header(width: int, height: int) -> bytes:
    """A PNG file whose header says width x height 8-bit grayscale pixels, with a few bytes of pixel data: what a
    decompression bomb shows before anything is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_too_many_pixels_is_said_from_the_header_under_a_bound_or_past_pillows_own(tmp_path):
    """A bound (serve's) is checked on the header's size before any decoding; past the size Pillow opens at all (a
    decompression bomb) the same kind of error says so, with or without a bound, and names no traceback."""
    pytest.importorskip("PIL")
    import io

    from cnnctl.data import pictures

    with pytest.raises(pictures.TooManyPixels, match="9000 x 9000 pixels, more than 50,000,000"):
        pictures.decode_image(io.BytesIO(png_header(9000, 9000)), (1, 8, 8), max_pixels=50_000_000)
    for bound in (None, 50_000_000):
        with pytest.raises(pictures.TooManyPixels, match="more pixels than Pillow decodes"):
            pictures.decode_image(io.BytesIO(png_header(30000, 30000)), (1, 8, 8), max_pixels=bound)
    (tmp_path / "bomb.png").write_bytes(png_header(30000, 30000))
    from cnnctl.errors import DataError

    with pytest.raises(DataError, match="bomb.png: more pixels than Pillow decodes"):  # a folder's decode names it
        pictures.decode_images([tmp_path / "bomb.png"], (1, 8, 8), "a folder")


def test_every_bad_file_of_a_folder_is_named_in_one_message(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from cnnctl.data import folder
    from cnnctl.errors import DataError

    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "good.png")
    (d / "text.png").write_bytes(b"not an image")
    _damaged_png(d / "chunk.png")
    _damaged_png(d / "header.png", 5)
    (d / "trunc.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    with pytest.raises(DataError) as e:
        folder.load_folder(tmp_path, (1, 8, 8))
    text = str(e.value)
    assert "4 of 5 files" in text and all(n in text for n in ("text.png", "chunk.png", "header.png", "trunc.jpg"))
    assert "SyntaxError" in text and "ValueError" in text
    assert "good.png" not in text


def test_predict_names_every_bad_picture_and_reads_16_bit(tiny_run, tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad1.png").write_bytes(b"junk")
    _damaged_png(tmp_path / "bad2.png")
    expect_error(["predict", tiny_run, tmp_path / "ok.png", tmp_path / "bad1.png", tmp_path / "bad2.png"],
                 "2 of 3 files in the inputs cannot be decoded", "bad1.png", "bad2.png")
    _png16(tmp_path / "wide.png", 65535)
    from cnnctl.tools.predict import load_inputs

    _, x = load_inputs([tmp_path / "wide.png"], (1, 16, 16))
    assert x.min() == 1.0


def test_pictures_without_pillow_name_the_images_extra(tiny_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "PIL", None)
    (tmp_path / "a.png").write_bytes(b"x")
    text = expect_error(["predict", tiny_run, tmp_path / "a.png"], "cnnctl[images]", "Pillow")
    assert "dataset: folder" not in text


@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(PICTURES, min_size=1, max_size=4), st.sampled_from([(1, 8, 8), (3, 5, 7)]))
def test_fuzzed_folder_images_give_data_or_one_clear_error(tmp_path_factory, pictures, shape):
    pytest.importorskip("PIL")
    from cnnctl.data import folder
    from cnnctl.errors import DataError

    root = tmp_path_factory.mktemp("folder")
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "ok.png").write_bytes(_png_bytes(99))
    for i, raw in enumerate(pictures):
        (root / "train" / "a" / f"f{i}.{'png' if i % 2 else 'jpg'}").write_bytes(raw)
    try:
        classes, (x, y), _ = folder.load_folder(root, shape)
    except DataError as e:
        assert "cannot be decoded" in e.message
    else:
        assert classes == ["a"] and x.shape[1:] == shape and x.dtype == np.uint8 and len(y) == len(x)


def test_predict_walks_folders_and_csvs_in_chunks_and_writes_a_file(tiny_run, tmp_path, monkeypatch):
    """A folder with class subfolders (and a loose picture), a CSV with labels: every picture predicted, a chunk
    at a time, with its true class and whether it was right, to a CSV and a JSONL file; the numbers of
    predicting the files one by one."""
    import csv
    import json

    from PIL import Image

    from cnnctl.cli import model as model_cli

    rng = np.random.default_rng(0)
    for k, cls in enumerate(["circle", "square", "nothing-known"]):
        (tmp_path / "pics" / cls / "deeper").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(
                tmp_path / "pics" / cls / ("deeper" if i == 2 else ".") / f"{k}{i}.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "pics" / "loose.png")
    (tmp_path / "pics" / "notes.txt").write_text("not a picture")
    (tmp_path / "list.csv").write_text("path,label\npics/circle/00.png,circle\npics/square/10.png,cross\n")
    monkeypatch.setattr(model_cli, "CHUNK", 4)
    invoke("predict", tiny_run, tmp_path / "pics", tmp_path / "list.csv", "--out", tmp_path / "p.csv")
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 10 + 2
    by_path = {r["input"]: r for r in rows[:10]}
    assert by_path[str(tmp_path / "pics" / "circle" / "deeper" / "02.png")]["label"] == "circle"
    assert by_path[str(tmp_path / "pics" / "loose.png")]["label"] == ""  # no class folder
    assert by_path[str(tmp_path / "pics" / "nothing-known" / "20.png")]["label"] == ""  # not a class of the model
    assert rows[-1]["label"] == "cross" and rows[-1]["correct"] == str(int(rows[-1]["prediction"] == "cross"))
    assert set(rows[0]) >= {"class_2", "probability_3", "correct"}
    one = json.loads(invoke("predict", tiny_run, tmp_path / "pics" / "circle" / "00.png", "--json").stdout)[0]
    mine = by_path[str(tmp_path / "pics" / "circle" / "00.png")]
    assert mine["prediction"] == one["prediction"]
    assert abs(float(mine["probability"]) - one["top"][0]["probability"]) < 1e-6
    res = invoke("predict", tiny_run, tmp_path / "pics", "--out", tmp_path / "p.jsonl")
    assert "10 predictions" in res.output and "right of 6 with a true class" in res.output
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 10 and all("top" in json.loads(line) for line in lines)
    res = invoke("predict", tiny_run, tmp_path / "pics", "--out", tmp_path / "p.txt", code=2)
    assert ".csv or .jsonl" in res.output
    (tmp_path / "empty").mkdir()
    assert "no picture files" in invoke("predict", tiny_run, tmp_path / "empty", code=2).output
