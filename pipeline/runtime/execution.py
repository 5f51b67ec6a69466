"""Which pipeline execution a stage belongs to, read from /proc.

`dvc repro` (or `dvc exp run`) runs every stage as a child process of itself, so the stages of
one execution share that DVC process as an ancestor. It keys the execution's MLflow parent run
and the local Ray its stages share. A pid alone can be reused once its process is gone; with
the process's start time it names one process for good.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


def _stat(pid: int) -> tuple[int, str, str]:
    """(parent pid, state letter, start time in clock ticks since boot) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0], fields[19]


def seconds_since_start(pid: int) -> float:
    """How long ago a process started, to the clock tick. (psutil's `create_time` adds the boot
    time, which /proc gives in whole seconds, so its ages are up to a second too long.)"""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - int(_stat(pid)[2]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessRef:
    pid: int
    started: str

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        return cls(pid, _stat(pid)[2])

    @classmethod
    def parse(cls, text: str) -> ProcessRef:
        pid, started = text.split("-", 1)
        return cls(int(pid), started)

    def __str__(self) -> str:
        return f"{self.pid}-{self.started}"

    def running(self) -> bool:
        """Still running: not exited, not a zombie waiting for its parent to read its status,
        and not another process that was given the same pid since."""
        try:
            _, state, started = _stat(self.pid)
        except (OSError, IndexError):
            return False
        return state != "Z" and started == self.started


def is_dvc_command(argv: list[str]) -> bool:
    """`dvc repro …` or `dvc exp …`: DVC's script run directly or by an interpreter, or `python -m dvc`."""
    for i, arg in enumerate(argv[:-1]):
        if Path(arg).name == "dvc" and (i <= 1 or argv[i - 1] == "-m"):
            return argv[i + 1] in ("repro", "exp")
    return False


def dvc_process(levels: int = 4) -> ProcessRef | None:
    """The `dvc repro` / `dvc exp` process this one runs under (DVC starts a stage through a
    shell, so it is a parent or a grandparent), or None for a stage run by hand."""
    pid = os.getpid()
    try:
        for _ in range(levels):
            pid = _stat(pid)[0]
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            if is_dvc_command(argv):
                return ProcessRef.of(pid)
    except (OSError, IndexError, ValueError):
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
