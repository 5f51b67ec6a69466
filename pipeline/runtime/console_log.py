"""A command's console output kept in a log file as well: the whole of what `make run` printed,
for when a stage fails and the terminal has scrolled, or was closed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

LOG_DIR = Path("logs")
KEEP_LOGS = 20  # the newest runs' logs; older ones are removed as a run starts
READER_GRACE_S = 2.0  # after the command exits: a process it left behind may hold its output open


class TeedProcess:
    """`cmd` running with its stdout and stderr copied, as they come, to this process's and to
    `log`. On a terminal the command gets a pseudo-terminal of the same size, so DVC, Ray and
    the stages still see a terminal (colours, progress bars, line buffering); otherwise it gets
    two pipes, and its stdout and stderr stay apart."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.log = log
        self.failed_stages: list[str] = []  # the stages DVC said it failed, as its lines pass
        log.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(log, "wb")  # noqa: SIM115 (closed in wait)
        self._lock = threading.Lock()
        if sys.stdout.isatty() and sys.stderr.isatty():
            import pty

            leader, follower = pty.openpty()
            _copy_window_size(sys.stdout.fileno(), follower)
            self.process = subprocess.Popen(cmd, env=env, stdout=follower, stderr=follower)
            os.close(follower)
            sources = [(leader, sys.stdout.buffer)]
        else:
            self.process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            sources = [(self.process.stdout.fileno(), sys.stdout.buffer),
                       (self.process.stderr.fileno(), sys.stderr.buffer)]
        self._readers = [threading.Thread(target=self._copy, args=source, daemon=True) for source in sources]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _copy(self, fd: int, console: BinaryIO) -> None:
        """The console gets each chunk as it comes; the log whole lines only, so that stdout's
        and stderr's lines never run into each other there."""
        pending = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # a pseudo-terminal's end: every process writing to it has exited
                break
            if not chunk:
                break
            console.write(chunk)
            console.flush()
            lines, _, pending = (pending + chunk).rpartition(b"\n")
            if lines:
                self.write(lines + b"\n")
        if pending:
            self.write(pending + b"\n")

    def write(self, data: bytes) -> None:
        """Add `data`, whole lines, to the log (a pseudo-terminal's line ends as a file's)."""
        with self._lock:
            self.failed_stages += failed_stages(data.decode(errors="replace"))
            if not self._file.closed:
                self._file.write(data.replace(b"\r\n", b"\n"))
                self._file.flush()

    def wait(self) -> int:
        code = self.process.wait()
        deadline = time.monotonic() + READER_GRACE_S
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        return code

    def kill(self) -> None:
        self.process.kill()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _copy_window_size(terminal: int, follower: int) -> None:
    import fcntl
    import termios

    try:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, fcntl.ioctl(terminal, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        pass  # no size to copy: the pseudo-terminal keeps its default


def new_log(root: Path, keep: int = KEEP_LOGS) -> Path:
    """A fresh `logs/run-<UTC time>.log` under `root`, the oldest removed so that `keep` stay."""
    folder = root / LOG_DIR
    folder.mkdir(exist_ok=True)
    for old in sorted(folder.glob("run-*.log"))[:-keep + 1 or None]:
        old.unlink(missing_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    log = folder / f"run-{stamp}.log"
    suffix = 1
    while log.exists():  # two runs in one second
        log, suffix = folder / f"run-{stamp}-{suffix}.log", suffix + 1
    return log


# DVC joins several names as "'a', 'b' and 'c'"; a name may hold a colon ('study/dvc.yaml:report').
FAILED = re.compile(r"failed to reproduce(?: stages:)? ((?:'[^']+'|, | and )+)")


def failed_stages(log_text: str) -> list[str]:
    """The stages DVC reported as failed, in its own words ("failed to reproduce 'x'")."""
    return [name for match in FAILED.finditer(log_text) for name in re.findall(r"'([^']+)'", match.group(1))]
