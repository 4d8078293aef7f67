"""cnnctl serve, as a client meets it: the server started as its own process on a free loopback port, every
endpoint called with a real HTTP client (httpx), /predict equal to `cnnctl predict --json`, a bounded load with
no failed request, each kind of bad input answered 4xx with a JSON error, SIGTERM with requests in flight (all
answered), an exported .onnx served through onnxruntime, and the page driven in headless Chromium."""

import base64
import importlib.util
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
Image = pytest.importorskip("PIL.Image")

from tests.helpers import invoke  # noqa: E402
from tests.test_pictures import png_header  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
serve_load = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_load)

DIGITS = {"name": "digits-serve", "seed": 0,
          "data": {"dataset": "digits", "batch_size": 64, "val_split": 0.1},
          "model": {"input_shape": [1, 8, 8], "layers": [
              {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": "same", "activation": "relu"},
              {"type": "maxpool2d", "kernel_size": 2}, {"type": "flatten"}, {"type": "dense", "units": 10}]},
          "optimizer": {"type": "adam", "lr": 0.01}, "train": {"epochs": 2}}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    pytest.importorskip("sklearn")
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "digits.yaml").write_text(yaml.safe_dump(DIGITS))
    invoke("train", tmp / "digits.yaml", "--runs-dir", tmp / "runs", "-q")
    run = next((tmp / "runs").iterdir())
    pictures = []
    for i, seed in enumerate((1, 2, 3)):  # three 8 x 8 grayscale pictures, one of them 24 x 24 (resized)
        size = 24 if i == 2 else 8
        px = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
        Image.fromarray(px).save(tmp / f"p{i}.png")
        pictures.append(tmp / f"p{i}.png")
    return run, pictures


class Server:
    def __init__(self, target, *options):
        self.proc, self.url = serve_load.start(target, *options)
        serve_load.ready(self.proc, self.url)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


@pytest.fixture(scope="module")
def server(digits_run):
    run, _ = digits_run
    s = Server(run, "--max-body-mb", "1", "--max-wait-ms", "20")
    yield s
    s.stop()
    assert s.proc.returncode in (0, -signal.SIGTERM), s.proc.stderr.read()  # uvicorn re-raises the signal


def _files(paths):
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def test_predict_equals_cnnctl_predict_for_files_raw_bytes_and_pixels(server, digits_run):
    run, pictures = digits_run
    printed = invoke("predict", run, *pictures, "--json", "--top-k", "5").stdout
    expected = json.loads(printed[printed.index("["):])  # after the line naming the checkpoint used
    got = httpx.post(f"{server.url}/predict", params={"top_k": 5}, files=_files(pictures)).json()
    assert [g["input"] for g in got] == [p.name for p in pictures]
    for g, e in zip(got, expected):
        assert g["prediction"] == e["prediction"] and [t["class"] for t in g["top"]] == [t["class"] for t in e["top"]]
        np.testing.assert_allclose([t["probability"] for t in g["top"]], [t["probability"] for t in e["top"]],
                                   rtol=0, atol=1e-6)
    raw = httpx.post(f"{server.url}/predict?top_k=5", content=pictures[0].read_bytes(),
                     headers={"content-type": "image/png"}).json()
    assert [t["class"] for t in raw[0]["top"]] == [t["class"] for t in got[0]["top"]]
    np.testing.assert_allclose([t["probability"] for t in raw[0]["top"]],  # a batch of 1, not 3: BLAS may round
                               [t["probability"] for t in got[0]["top"]], atol=1e-6)  # its sums differently
    pixels = np.asarray(Image.open(pictures[0]), np.float64) / 255
    js = httpx.post(f"{server.url}/predict?top_k=5", json=pixels.tolist()).json()
    np.testing.assert_allclose([t["probability"] for t in js[0]["top"]], [t["probability"] for t in got[0]["top"]],
                               atol=1e-6)


def test_the_open_inference_protocol_metrics_and_openapi(server, digits_run):
    _, pictures = digits_run
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v2").json()["name"] == "cnnctl"
    meta = httpx.get(f"{server.url}/v2/models/digits-serve").json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8] and meta["parameters"]["classes"] == [str(i) for i in range(10)]
    assert httpx.get(f"{server.url}/v2/models/digits-serve/ready").status_code == 200
    px = (np.asarray(Image.open(pictures[1]), np.float32) / 255)[None, None]
    body = {"id": "r1", "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                    "data": px.ravel().tolist()}]}
    res = httpx.post(f"{server.url}/v2/models/digits-serve/infer", json=body).json()
    assert res["id"] == "r1" and res["outputs"][0]["shape"] == [1, 10]
    probs = np.asarray(res["outputs"][0]["data"])
    top = httpx.post(f"{server.url}/predict?top_k=1", files=_files(pictures[1:2])).json()[0]["top"][0]
    assert abs(probs.max() - top["probability"]) < 1e-6 and str(probs.argmax()) == top["class"]
    as_uint8 = dict(body["inputs"][0], datatype="UINT8", data=np.asarray(Image.open(pictures[1])).ravel().tolist())
    res8 = httpx.post(f"{server.url}/v2/models/digits-serve/infer", json={"inputs": [as_uint8]}).json()
    np.testing.assert_allclose(res8["outputs"][0]["data"], probs, atol=1e-6)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'cnnctl_requests_total{path="/predict",status="200"}' in text
    assert "cnnctl_request_seconds_bucket" in text and "cnnctl_batch_images_count" in text
    assert "cnnctl_ready 1" in text
    images = int(next(line.split()[1] for line in text.splitlines() if line.startswith("cnnctl_images_total")))
    assert images >= 2
    api = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/predict", "/explain", "/v2/health/ready", "/v2/models/{name}/infer", "/metrics"} <= set(api["paths"])
    assert "multipart/form-data" in api["paths"]["/predict"]["post"]["requestBody"]["content"]
    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    png = httpx.post(f"{server.url}/explain", files=_files(pictures[:1]))
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def _bomb(tmp_path):
    """A small PNG whose header says 8,000 x 8,000 pixels (zeros compress to almost nothing)."""
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, "PNG")
    return buf.getvalue()


BAD = [  # (request, status, words the error names)
    (dict(content=b"not a picture", headers={"content-type": "image/png"}), 415, "not a picture"),
    (dict(content=b"", headers={"content-type": "image/png"}), 422, "empty"),
    (dict(content=b"x" * (2 * 2**20), headers={"content-type": "image/png"}), 413, "over 1,048,576 bytes"),
    (dict(content=iter([b"x" * 2**19] * 3), headers={"content-type": "image/png"}), 413, "over 1,048,576 bytes"),
    (dict(json=np.zeros((3, 8, 8)).tolist()), 422, "3 channels"),
    (dict(json=np.zeros((1, 9, 8)).tolist()), 422, "9 x 8 pixels"),
    (dict(json=[[1, 2], [3]]), 422, "not a rectangular array"),
    (dict(json=np.zeros((257, 1, 8, 8), np.uint8).tolist()), 413, "257 images"),
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    (dict(content=b"hello", headers={"content-type": "text/plain"}), 415, "content type 'text/plain'"),
    (dict(files=[("notes", ("a.txt", b"just text", "text/plain"))]), 415, "a.txt: not a picture"),
    (dict(files={"field": (None, b"a text field, no file")}), 422, "no images"),
]


@pytest.mark.parametrize("request_,status,words", BAD, ids=lambda v: str(v)[:30] if isinstance(v, str) else None)
def test_bad_input_is_a_4xx_with_a_json_error_naming_it(server, request_, status, words):
    r = httpx.post(f"{server.url}/predict", timeout=30, **request_)
    assert r.status_code == status, r.text
    assert words in r.json()["error"] and "Traceback" not in r.text


def test_bad_tensors_names_and_pixel_bombs(server, tmp_path):
    url = server.url
    cases = [
        (httpx.post(f"{url}/v2/models/other/infer", json={}), 404, "no model named 'other'"),
        (httpx.get(f"{url}/v2/models/other"), 404, "no model named 'other'"),
        (httpx.post(f"{url}/v2/models/digits-serve/infer", json={"inputs": [{"name": "input", "shape": [1, 1, 8, 8],
                                                                             "datatype": "FP32", "data": [0] * 63}]}),
         422, "holds 63 values"),
        (httpx.post(f"{url}/v2/models/digits-serve/infer", json={"inputs": [{"name": "input", "shape": [1, 8, 8],
                                                                             "datatype": "FP32", "data": [0] * 64}]}),
         422, "tensor shape [1, 8, 8]"),
        (httpx.post(f"{url}/v2/models/digits-serve/infer", json={"inputs": [{"name": "input", "shape": [1, 1, 8, 8],
                                                                             "datatype": "BYTES", "data": []}]}),
         422, "datatype 'BYTES'"),
        (httpx.post(f"{url}/v2/models/digits-serve/infer", json={"outputs": []}), 422, "inputs"),
        (httpx.post(f"{url}/predict", content=_bomb(tmp_path), headers={"content-type": "image/png"}), 413,
         "8000 x 8000 pixels"),
        (httpx.post(f"{url}/predict", content=png_header(30000, 30000), headers={"content-type": "image/png"}), 413,
         "more pixels than Pillow decodes"),
        (httpx.post(f"{url}/predict?top_k=0", json=[[0] * 8] * 8), 422, "top_k"),
        (httpx.get(f"{url}/no/such/page"), 404, "Not Found"),
        (httpx.get(f"{url}/predict"), 405, "Method Not Allowed"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (words, r.text)
        assert words in r.json()["error"], r.text


def test_a_bounded_load_is_answered_without_a_failure_and_batched(server, digits_run):
    _, pictures = digits_run
    body = pictures[0].read_bytes()
    before = httpx.get(f"{server.url}/metrics").text
    res = serve_load.load(server.url, body, "image/png", requests=300, concurrency=8)
    assert res["failed"] == 0, res["failures"]
    after = httpx.get(f"{server.url}/metrics").text

    def count(text, name):
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))
    batches = count(after, "cnnctl_batch_images_count") - count(before, "cnnctl_batch_images_count")
    images = count(after, "cnnctl_images_total") - count(before, "cnnctl_images_total")
    assert images == 300 and batches < 300  # concurrent requests shared forward passes


def test_sigterm_answers_the_requests_in_flight_then_stops(digits_run):
    """Six clients each upload a picture slowly (in three pieces over a second); SIGTERM arrives while every
    upload is under way: each is still read, computed and answered, then the server exits."""
    run, pictures = digits_run
    s = Server(run)
    blob = pictures[0].read_bytes()
    answers = []

    def slowly():
        for k in range(3):
            time.sleep(0.4)
            yield blob[k * len(blob) // 3:(k + 1) * len(blob) // 3]

    def ask():
        try:
            r = httpx.post(f"{s.url}/predict", content=slowly(), headers={"content-type": "image/png"}, timeout=30)
            answers.append((r.status_code, r.json()[0]["prediction"]))
        except httpx.HTTPError as e:
            answers.append(repr(e))

    clients = [threading.Thread(target=ask) for _ in range(6)]
    for c in clients:
        c.start()
    time.sleep(0.6)  # every upload has begun, none has ended
    s.proc.send_signal(signal.SIGTERM)
    for c in clients:
        c.join(30)
    assert [a[0] for a in answers] == [200] * 6, answers
    assert s.proc.wait(30) in (0, -signal.SIGTERM), s.proc.stderr.read()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{s.url}/v2/health/live", timeout=2)


def test_an_exported_onnx_model_is_served_through_onnxruntime(digits_run, server, tmp_path):
    pytest.importorskip("onnxruntime")
    run, pictures = digits_run
    invoke("export", run, "--out", tmp_path / "m.onnx")
    s = Server(tmp_path / "m.onnx", "--name", "digits-onnx")
    try:
        meta = httpx.get(f"{s.url}/v2/models/digits-onnx").json()
        assert meta["platform"] == "onnxruntime" and meta["parameters"]["classes"] == [str(i) for i in range(10)]
        got = httpx.post(f"{s.url}/predict?top_k=10", files=_files(pictures)).json()
        ours = httpx.post(f"{server.url}/predict?top_k=10", files=_files(pictures)).json()
        for g, o in zip(got, ours):
            assert g["prediction"] == o["prediction"]
            np.testing.assert_allclose(sorted(t["probability"] for t in g["top"]),
                                       sorted(t["probability"] for t in o["top"]), atol=1e-5)
        r = httpx.post(f"{s.url}/explain", files=_files(pictures[:1]))
        assert r.status_code == 404 and "Grad-CAM" in r.json()["error"]
    finally:
        s.stop()


def test_the_int8_model_is_served_and_agrees_with_the_float_one(digits_run, server, tmp_path):
    """export --int8's file through onnxruntime: its probabilities near the float model's on the run's own test
    pictures (pixels sent as an infer tensor)."""
    pytest.importorskip("onnxruntime")
    from cnnctl import api
    from cnnctl.run.start import data_as_run

    run, _ = digits_run
    invoke("export", run, "--out", tmp_path / "m.onnx", "--int8", "--calibrate", "128", "--max-drop", "100")
    ds = data_as_run(api.load(run).spec)
    x = ds.test.x[:64]
    s = Server(tmp_path / "m-int8.onnx", "--name", "int8")
    try:
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "UINT8", "data": x.ravel().tolist()}]}

        def probabilities(url, name):
            out = httpx.post(f"{url}/v2/models/{name}/infer", json=body).json()["outputs"][0]
            return np.asarray(out["data"]).reshape(out["shape"])
        int8, ours = probabilities(s.url, "int8"), probabilities(server.url, DIGITS["name"])
        assert (int8.argmax(1) == ours.argmax(1)).mean() > 0.9 and np.abs(int8 - ours).max() < 0.5
    finally:
        s.stop()


def test_what_cannot_be_served_is_refused_before_listening(tmp_path, digits_run):
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    res = invoke("serve", tmp_path / "x.onnx", code=2)
    assert "onnxruntime cannot load it" in res.output
    res = invoke("serve", tmp_path / "missing", code=2)
    assert "Traceback" not in res.output


def test_a_taken_port_is_one_error_and_port_0_announces_the_port_it_got(digits_run):
    """The address is bound before the "serving ... on" line: a port in use gives only the error (exit 2), and
    --port 0 announces the port the system chose, where the server then answers."""
    import socket

    run, _ = digits_run
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "cnnctl", "serve", str(run), "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in res.stderr + res.stdout
    assert "serving" not in res.stdout and "Traceback" not in res.stderr
    proc = subprocess.Popen([sys.executable, "-m", "cnnctl", "serve", str(run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        chosen = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert chosen > 0
        serve_load.ready(proc, f"http://127.0.0.1:{chosen}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _browser():
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium (.ci/run installs chromium-headless-shell)")
def test_the_page_in_a_real_browser_shows_the_top_five_and_the_overlay_for_a_dropped_picture(server, digits_run):
    """Chromium opens the page, a picture is dropped on it (a DataTransfer drop event, as a person's drop
    fires), and the page shows five classes and the Grad-CAM picture, with no console error."""
    websocket = pytest.importorskip("websocket")
    _, pictures = digits_run
    port = serve_load.free_port()
    chrome = subprocess.Popen([_browser(), "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
                               "--remote-allow-origins=*", "about:blank"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 30
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=1).json()
                page = next(t for t in targets if t["type"] == "page")
                break
            except (httpx.TransportError, StopIteration):
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30)
        ids, events = iter(range(1, 10**6)), []

        def call(method, **params):
            n = next(ids)
            ws.send(json.dumps({"id": n, "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == n:
                    assert "error" not in msg, msg
                    return msg.get("result", {})
                events.append(msg)

        def evaluate(expr):
            return call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)["result"].get(
                "value")

        call("Runtime.enable")
        call("Log.enable")
        call("Page.enable")
        call("Page.navigate", url=server.url + "/")
        end = time.monotonic() + 20
        while evaluate("document.readyState") != "complete" or not evaluate("!!document.getElementById('drop')"):
            assert time.monotonic() < end
            time.sleep(0.1)
        b64 = base64.b64encode(pictures[0].read_bytes()).decode()
        evaluate(f"""(() => {{
            const bytes = Uint8Array.from(atob('{b64}'), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'p0.png', {{type: 'image/png'}}));
            document.getElementById('drop').dispatchEvent(new DragEvent('drop', {{dataTransfer: dt, bubbles: true,
                                                                                  cancelable: true}}));
        }})()""")
        end = time.monotonic() + 30
        while evaluate("document.body.dataset.state || ''") not in ("done", "failed"):
            assert time.monotonic() < end, "the page never showed a result"
            time.sleep(0.1)
        assert evaluate("document.body.dataset.state") == "done", evaluate("document.getElementById('error')"
                                                                             ".textContent")
        rows = evaluate("[...document.querySelectorAll('#top tr')].map(r => r.cells[0].textContent)")
        expected = httpx.post(f"{server.url}/predict?top_k=5", files=_files(pictures[:1])).json()[0]
        assert rows == [t["class"] for t in expected["top"]]
        assert evaluate("document.getElementById('overlay').naturalWidth") > 100
        call("Runtime.evaluate", expression="1")  # drain the events that arrived meanwhile
        errors = [e for e in events if e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")]
        assert not errors, errors
        ws.close()
    finally:
        chrome.terminate()
        chrome.wait(30)


def test_without_the_serve_extra_the_verb_names_the_install_line(monkeypatch, digits_run):
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if FastAPI were not installed
    monkeypatch.delitem(sys.modules, "cnnctl.serve.app", raising=False)
    res = invoke("serve", digits_run[0], code=2)
    assert "needs FastAPI and uvicorn" in res.output and "pip install 'cnnctl[serve]'" in res.output
