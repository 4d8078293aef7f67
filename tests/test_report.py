"""cnnctl report: the page of a finished, a running, a failed and an interrupted run and of a sweep parses as
HTML, every picture decodes, nothing refers outside the file; and a real browser renders it."""

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml

from cnnctl.tools import markup, report
from tests.conftest import TINY
from tests.helpers import invoke

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.refs, self.tags, self.headings, self.tables = [], [], [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(a)
        if tag in ("h1", "h2", "h3"):
            self.headings.append(tag)
        if tag == "table":
            self.tables += 1
        for key in ("src", "href", "action", "data", "poster"):
            if key in a:
                self.refs.append(a[key])


def _check(path, pages=()):
    text = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    assert "h1" in page.headings and page.tables >= 1
    assert "script" not in page.tags and "link" not in page.tags and "@import" not in text and "url(" not in text
    for ref in page.refs:  # pictures inline; nothing outside the file but the links to the `pages` named
        assert ref.startswith("data:image/png;base64,") or ref in pages, ref
    for img in page.images:
        assert img.get("alt"), img  # every picture says what it shows
        png = base64.b64decode(img["src"].split(",", 1)[1])
        with Image.open(io.BytesIO(png)) as im:
            im.load()
            assert im.size[0] > 10 and im.size[1] > 10
    assert path.stat().st_size < 5e6
    return text, page


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    spec = yaml.safe_load(TINY)
    spec["train"].update(epochs=2, test_at_end=True)
    (tmp / "c.yaml").write_text(yaml.safe_dump(spec))
    invoke("train", tmp / "c.yaml", "--runs-dir", tmp / "runs")
    (run,) = (tmp / "runs").iterdir()
    return tmp, run


def test_the_page_of_a_finished_run(finished):
    tmp, run = finished
    res = invoke("report", run)
    assert "wrote" in res.output and (run / "report.html").is_file()
    text, page = _check(run / "report.html")
    for section in ("Config", "Model", "Learning curves", "<h2>Data</h2>", "Images per class in each split",
                    "training images of each class", "<dt>command</dt>", "Evaluation on the test split", "Per class",
                    "The most confused pairs", "Calibration", "Expected calibration error", "most confidently wrong",
                    "first layer", "Execution plan"):
        assert section in text, section
    assert len(page.images) >= 6 and "Status: finished" in text
    assert '<td class="l">all classes</td><td class="">240</td><td class="">60</td><td class="">100</td>' in text


def test_the_pages_of_running_failed_and_interrupted_runs(finished, tmp_path):
    _, run = finished
    for status in ("running", "failed", "interrupted"):
        copy = tmp_path / status
        shutil.copytree(run, copy)
        summary = json.loads((copy / "summary.json").read_text())
        summary.update(status=status, pid=2**22 + 7 if status == "running" else summary.get("pid"),
                       **({"error": "the loss became nan at epoch 2"} if status == "failed" else {}))
        if status == "running":  # alive: this process's pid
            import os

            summary["pid"] = os.getpid()
        (copy / "summary.json").write_text(json.dumps(summary))
        if status == "interrupted":  # killed before its first checkpoint: nothing to evaluate
            shutil.rmtree(copy / "checkpoints")
            (copy / "metrics.jsonl").unlink()
        invoke("report", copy, "--out", tmp_path / f"{status}.html")
        text, _ = _check(tmp_path / f"{status}.html")
        assert f"Status: {status}" in text
    assert "the loss became nan" in (tmp_path / "failed.html").read_text()
    assert "No checkpoint yet" in (tmp_path / "interrupted.html").read_text()


def test_the_page_of_a_sweep(tmp_path):
    """Its trials ranked with test accuracy, wall time and a link to each trial's own page (written beside the
    trial), each trial's curve, and the metric against the searched key."""
    base = yaml.safe_load(TINY)
    base["train"]["test_at_end"] = True
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "s", "base": "base.yaml", "metric": "val_acc", "space": {"optimizer.lr": {"choice": [0.001, 0.01]},
                                                                        "train.epochs": 1},
        "search": {"type": "grid"}, "executor": {"type": "local", "max_concurrent": 2}}))
    invoke("sweep", tmp_path / "sweep.yaml", "--runs-dir", tmp_path / "runs", "-q")
    (sweep_dir,) = (tmp_path / "runs").iterdir()
    invoke("report", sweep_dir)
    links = {f"trials/trial-00{i}/report.html" for i in range(2)}
    text, page = _check(sweep_dir / "report.html", links)
    assert "Trials ranked by val_acc" in text and "optimizer.lr=0.01" in text and len(page.images) == 2
    assert set(page.refs) - {r for r in page.refs if r.startswith("data:")} == links
    for i in range(2):
        trial = sweep_dir / "trials" / f"trial-00{i}"
        test = json.loads((trial / "summary.json").read_text())["test"]["accuracy"]
        wall = json.loads((trial / "summary.json").read_text())["wall_seconds"]
        assert re.search(rf"<td class=\"l\">trial-00{i}</td>.*?<td class=\"\">{100 * test:.2f}%</td>.*? s</td>",
                         text), text
        assert wall > 0 and "Evaluation on the test split" in _check(trial / "report.html")[0]
    assert "Each trial&#x27;s curve" in text or "Each trial's curve" in text
    written = (sweep_dir / "trials" / "trial-000" / "report.html").stat().st_mtime_ns
    invoke("report", sweep_dir, "--out", tmp_path / "elsewhere" / "s.html")  # the links follow the page
    assert 'href="../runs/' in (tmp_path / "elsewhere" / "s.html").read_text()
    assert (sweep_dir / "trials" / "trial-000" / "report.html").stat().st_mtime_ns == written  # up to date: kept
    from cnnctl.tools.sweep_page import _up_to_date

    trial = sweep_dir / "trials" / "trial-001"
    assert _up_to_date(trial / "report.html", trial)
    (trial / "summary.json").touch()  # the trial changed since its page: written again next time
    assert not _up_to_date(trial / "report.html", trial)


def _browser():
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium (.ci/run installs chromium-headless-shell)")
def test_a_real_browser_renders_every_picture_without_console_errors(finished, tmp_path):
    _, run = finished
    invoke("report", run, "--out", tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    script = ("<script>addEventListener('load', () => { document.title = 'widths:' + "
              "[...document.images].map(i => i.naturalWidth).join(','); });</script></body>")

    def dump(name, html):
        (tmp_path / name).write_text(html)
        res = subprocess.run([_browser(), "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                              "--enable-logging=stderr", "--v=0", "--dump-dom", (tmp_path / name).as_uri()],
                             capture_output=True, text=True, timeout=120)
        return res, res.stdout.split("<title>", 1)[1].split("</title>", 1)[0]

    # the page's Content-Security-Policy allows no script: a script that found its way in does not run
    csp = f'<meta http-equiv="Content-Security-Policy" content="{markup.CSP}">'
    assert csp in page
    _, title = dump("injected.html", page.replace("</body>", script))
    assert not title.startswith("widths:"), title
    # a copy without it, with the check appended: after load, every picture's natural width goes into the title
    res, title = dump("probe.html", page.replace(csp, "").replace("</body>", script))
    widths = [int(w) for w in title.removeprefix("widths:").split(",")]
    assert widths and all(w > 0 for w in widths), title
    assert "Uncaught" not in res.stderr and "CONSOLE" not in res.stderr, res.stderr[-2000:]
    shot = tmp_path / "shot.png"
    subprocess.run([_browser(), "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2000",
                    f"--screenshot={shot}", (tmp_path / "page.html").as_uri()], capture_output=True, timeout=120,
                   check=True)
    with Image.open(shot) as im:
        assert im.size == (1200, 2000) and np.asarray(im).std() > 5  # a page, not a blank


def test_every_picture_s_text_is_readable_as_a_browser_shows_it(finished, tmp_path, monkeypatch):
    """The smallest text of every picture (titles, tick labels, colour bars, counts), at the size Chromium draws the
    picture in a 1280-pixel window at 100% zoom, is 10 pixels or more."""
    import hashlib

    from matplotlib.text import Text

    from cnnctl.tools import plots

    _, run = finished
    smallest, save = {}, plots._save

    def measured(fig, out):
        fig.canvas.draw()  # tick labels exist once drawn
        sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
        png = save(fig, out)
        smallest[hashlib.sha256(png).hexdigest()] = min(sizes, default=float("inf")) * plots.DPI / 72
        return png

    monkeypatch.setattr(plots, "_save", measured)
    invoke("report", run, "--out", tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    pngs = [base64.b64decode(src) for src in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]
    script = ("<script>addEventListener('load', () => { document.title = 'sizes:' + JSON.stringify("
              "[...document.images].map(i => [i.naturalWidth, i.getBoundingClientRect().width])); });</script>")
    csp = f'<meta http-equiv="Content-Security-Policy" content="{markup.CSP}">'
    (tmp_path / "probe.html").write_text(page.replace(csp, "").replace("</body>", script + "</body>"))
    res = subprocess.run([_browser(), "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--window-size=1280,900", "--force-device-scale-factor=1", "--dump-dom",
                          (tmp_path / "probe.html").as_uri()], capture_output=True, text=True, timeout=120)
    shown = json.loads(res.stdout.split("<title>sizes:", 1)[1].split("</title>", 1)[0].replace("&quot;", '"'))
    assert len(shown) == len(pngs) >= 6
    small = [(round(smallest[hashlib.sha256(png).hexdigest()] * drawn / natural, 1), natural, drawn)
             for png, (natural, drawn) in zip(pngs, shown)]
    assert all(px >= 10 for px, _, _ in small), small


def test_without_matplotlib_the_report_names_the_install_that_makes_it_work(finished, monkeypatch):
    import sys

    _, run = finished
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = invoke("report", run, code=2)
    assert "pip install 'cnnctl[plot]'" in res.output and "leave out --out" not in res.output


def test_eval_records_the_test_result_that_runs_and_the_report_show(finished, tmp_path):
    """A run trained without a test at the end: the report's header gives its own evaluation of the test split
    (saying so), then `cnnctl eval` of the run records its result, which `cnnctl runs` and the header show."""
    _, run = finished
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary.pop("test")
    (copy / "summary.json").write_text(json.dumps(summary))
    assert json.loads(invoke("runs", tmp_path / "runs", "--json").stdout)[0]["test_acc"] is None
    invoke("report", copy, "--out", tmp_path / "before.html")
    header = (tmp_path / "before.html").read_text().split("</header>")[0]
    assert re.search(r"<dt>test accuracy</dt><dd>\d+\.\d\d% on 100 images \(this page&#x27;s evaluation of "
                     r"best.safetensors, one view per image\)</dd>", header), header

    res = invoke("eval", copy, "--json")
    recorded = json.loads((copy / "summary.json").read_text())["test"]
    result = json.loads(res.stdout)
    assert result["recorded_in"] == str(copy / "summary.json") and "recorded as" not in res.output  # JSON alone
    assert f"recorded in {copy / 'summary.json'} as the run's test result" in invoke("eval", copy).stderr
    assert result["recorded_as"] == "test"
    own = shutil.copytree(run, tmp_path / "own" / run.name)  # a run with test_at_end's result keeps it
    assert "under evaluations (the run has its own test result)" in invoke("eval", own).stderr
    assert json.loads((own / "summary.json").read_text())["test"] == json.loads((run / "summary.json").read_text())[
        "test"]
    assert recorded["accuracy"] == result["accuracy"] and recorded["by"] == "cnnctl eval"
    assert json.loads(invoke("runs", tmp_path / "runs", "--json").stdout)[0]["test_acc"] == result["accuracy"]
    assert f"{100 * result['accuracy']:.2f}%" in invoke("runs", tmp_path / "runs").output
    invoke("report", copy, "--out", tmp_path / "after.html")
    assert (f"<dt>test accuracy</dt><dd>{100 * result['accuracy']:.2f}% on 100 images (cnnctl eval of "
            "best.safetensors)</dd>") in (tmp_path / "after.html").read_text()

    invoke("eval", copy, "--set", "data.batch_size=16")  # another config, or another split: not the run's result
    invoke("eval", copy, "--data-split", "val")
    assert json.loads((copy / "summary.json").read_text())["test"] == recorded


def test_a_long_model_table_starts_collapsed_and_a_short_one_open(tmp_path):
    from cnnctl.config.reading import load_config, validate
    from tests.conftest import ROOT

    resnet, _ = load_config(ROOT / "configs" / "resnet20-cifar10.yaml")
    long = report._model_table(resnet)
    assert re.search(r"<details><summary>The \d+ layers</summary><table>", long) and "parameters, " in long
    short = report._model_table(validate(yaml.safe_load(TINY)))
    assert "<details>" not in short and "<table>" in short
