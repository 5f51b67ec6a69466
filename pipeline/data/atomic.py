"""Outputs that appear whole or not at all: written to a staging place beside them, then renamed."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def publish(tmp: Path, final: Path) -> None:
    """Move a completed output into place, so a killed stage never leaves a half-written one."""
    remove_path(final)
    tmp.rename(final)


def write_text_atomic(path: Path, text: str) -> None:
    with staged(path) as tmp:
        tmp.write_text(text)


@contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A temp path for `final`, moved into place when the block completes and removed when it
    raises, so nothing half-written is ever left where `final` belongs. `final`'s folder is
    created if missing.

    Inside a DVC project the temp lives in the project's scratch folder `.dvc/tmp/staging/`,
    not next to the output: a stage killed outright (SIGKILL, power loss) cannot clean up, and
    when DVC then restores that stage from its run cache no stage code runs to do it either.
    Leftovers of dead writers there are removed by the next write."""
    tmp, holder = _temp_location(final)
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    else:
        publish(tmp, final)
    finally:
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)


STAGING = Path(".dvc/tmp/staging")


def _temp_location(final: Path) -> tuple[Path, Path | None]:
    """(temp path, the folder holding it that is removed afterwards): `<holder>/<name>` with
    holder `.dvc/tmp/staging/<host>-<pid>-<n>` of the DVC project holding `final` (same
    filesystem, so the final rename is atomic), else the hidden sibling `.<name>.tmp`."""
    staging = _staging_dir(final)
    if staging is None:
        tmp = final.with_name(f".{final.name}.tmp")
        remove_path(tmp)
        return tmp, None
    _sweep_dead_writers(staging)
    holder = Path(tempfile.mkdtemp(prefix=f"{socket.gethostname()}-{os.getpid()}-", dir=staging))
    return holder / final.name, holder


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _staging_dir(final: Path) -> Path | None:
    parent = final.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    for root in (parent, *parent.parents):
        if (root / ".dvc").is_dir():
            staging = root / STAGING
            staging.mkdir(parents=True, exist_ok=True)
            return staging if staging.stat().st_dev == parent.stat().st_dev else None
    return None


def _sweep_dead_writers(staging: Path) -> None:
    """Remove what writers on this host that no longer run left behind."""
    host = socket.gethostname()
    for holder in staging.iterdir():
        owner, _, pid = holder.name.rsplit("-", 1)[0].rpartition("-")  # <host>-<pid>-<n>
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(holder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True
