"""Run cnnctl as a user does: in a pseudo-terminal of a given width, as its own process, with a time bound."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

# variables that would make rich treat the pseudo-terminal as something else, or size it
_SCRUB = ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "TERM",
          "JUPYTER_COLUMNS", "JUPYTER_LINES")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Screen:
    """What a terminal showed: the raw bytes, the text without escape sequences, and the exit code."""

    def __init__(self, raw: bytes, code: int):
        self.raw = raw.decode("utf-8", errors="replace")
        self.text = _ANSI.sub("", self.raw)
        self.code = code

    def last_lines(self, n: int) -> list[str]:
        return [line for line in self.text.splitlines() if line.strip()][-n:]


def run_in_terminal(args, columns: int = 80, rows: int = 24, timeout: float = 120, cwd=None, argv=None) -> Screen:
    """`python -m cnnctl ARGS` (or `argv` as given) with a pseudo-terminal as stdin, stdout and stderr; the run
    must end within `timeout` seconds (else it is killed and the test fails with what the screen showed)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(argv or [sys.executable, "-m", "cnnctl", *map(str, args)], stdin=slave, stdout=slave,
                            stderr=slave, cwd=cwd, env=env, start_new_session=True, close_fds=True)
    os.close(slave)
    raw = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError(f"cnnctl {' '.join(map(str, args))} did not end within {timeout} s at "
                                     f"{columns} columns; the screen showed:\n{Screen(bytes(raw), -9).text[-3000:]}")
            ready, _, _ = select.select([master], [], [], min(left, 0.5))
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError as e:  # EIO: every holder of the terminal's other end has closed it
                if e.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            raw += chunk
    finally:
        os.close(master)
    return Screen(bytes(raw), proc.wait(timeout=30))


def emulated(screen: Screen, columns: int, rows: int = 500) -> str:
    """The text a terminal of `columns` shows once the output has played (pyte, a terminal emulator: cursor
    moves and erasures applied, as a live display that redraws itself leaves it), trailing blank lines dropped."""
    import pyte

    term = pyte.Screen(columns, rows)
    pyte.Stream(term).feed(screen.raw.replace("\n", "\r\n"))
    return "\n".join(line.rstrip() for line in term.display).rstrip()
