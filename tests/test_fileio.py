"""Files cnnctl writes (core/fileio.py): devices, FIFOs, links and sockets at the output path, unwritable places,
and the picture writers' OS errors."""
import json
import os
import socket
import stat
import threading

import pytest

from tests.conftest import TINY
from tests.helpers import invoke, write_tiny
from tests.test_errors import expect_error


def _device(tmp_path, name, minor):
    """A character device of our own (1, minor: 3 is null, 7 is full), never the machine's /dev entries."""
    path = tmp_path / name
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("making a device node needs root")
    return path


UNWRITABLE = "/proc/cnnctl-no/out.png"  # a folder that can never be made, whoever runs the tests


@pytest.mark.parametrize("verb", [
    lambda run, cfg, out: ["schema", "--out", out],
    lambda run, cfg, out: ["plot", run, "--out", out],
    lambda run, cfg, out: ["data", cfg, "--out", out],
    lambda run, cfg, out: ["export", run, "--out", out],
])
def test_a_device_at_the_output_path_is_written_in_place_never_replaced(tiny_run, tmp_path, verb):
    pytest.importorskip("matplotlib")
    pytest.importorskip("onnx")
    null = _device(tmp_path, "null", 3)
    invoke(*verb(tiny_run, write_tiny(tmp_path), null))
    assert stat.S_ISCHR(os.lstat(null).st_mode) and os.stat(null).st_rdev == os.makedev(1, 3)


def test_a_full_device_is_one_message_and_stays_a_device(tmp_path):
    full = _device(tmp_path, "full", 7)
    expect_error(["schema", "--out", full], f"cannot write {full}", "No space left on device")
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_a_fifo_at_the_output_path_gets_the_bytes_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    invoke("schema", "--out", fifo)
    reader.join(30)
    assert json.loads(got[0])["title"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_symlink_is_followed_and_stays_a_link(tmp_path):
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(target.name)
    invoke("schema", "--out", link)
    assert link.is_symlink() and json.loads(target.read_text())["title"]
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to("made.json")  # a link to nothing yet: the file it names is made, as `>` does
    invoke("schema", "--out", dangling)
    assert dangling.is_symlink() and (tmp_path / "made.json").is_file()


def test_a_socket_or_a_link_loop_at_the_output_path_is_refused(tmp_path):
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        expect_error(["schema", "--out", path], "it is a socket")
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    expect_error(["schema", "--out", tmp_path / "a"], "Too many levels of symbolic links")


@pytest.mark.parametrize("verb", [
    lambda run, cfg: ["plot", run, "--out", UNWRITABLE],
    lambda run, cfg: ["viz", run, "--out", UNWRITABLE],
    lambda run, cfg: ["eval", run, "--plot", UNWRITABLE],
    lambda run, cfg: ["lr-find", cfg, "--out", UNWRITABLE, "--steps", "3"],
    lambda run, cfg: ["export", run, "--out", "/proc/cnnctl-no/m.onnx"],
    lambda run, cfg: ["schema", "--out", "/proc/cnnctl-no/s.json"],
    lambda run, cfg: ["data", cfg, "--out", UNWRITABLE],
])
def test_unwritable_outputs_are_refused_before_any_work(tiny_run, tmp_path, verb):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    text = expect_error(verb(tiny_run, cfg), "/proc/cnnctl-no", "cannot write there")
    assert "accuracy" not in text  # eval --plot: refused before the evaluation, not after


def test_a_folder_given_as_the_output_file_is_refused(tiny_run, tmp_path):
    expect_error(["plot", tiny_run, "--out", tmp_path], "it is a folder")


def test_picture_writers_turn_os_errors_into_one_message(tmp_path):
    pytest.importorskip("matplotlib")
    from cnnctl.errors import CnnctlError
    from cnnctl.tools import plots

    (tmp_path / "file").write_text("")  # a file where the folder should be (root ignores permissions)
    with pytest.raises(CnnctlError, match="cannot write .*x.png: Not a directory"):
        plots.plot_lr_find([1e-3, 1e-2], [1.0, 0.5], None, tmp_path / "file" / "x.png", "t")
