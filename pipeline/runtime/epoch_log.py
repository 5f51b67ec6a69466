"""Each epoch's metrics, from rank 0 of a training job to the stage's MLflow run.

Rank 0 writes each epoch's metrics as one small JSON file into the job's run folder under
`ray.storage_path` (`<run>/epochs/`), beside its checkpoints; the stage's process, which waits on
the job (and opens its MLflow run meanwhile), logs each new file to the run from a thread and
then deletes it, and logs whatever is left once the job is back. So the workers never import
MLflow (its import and its store's first connection took 1.3-1.9 s here, on a worker's path
between its first epoch and that epoch's report), and they reach only the storage their
checkpoints go to, never the tracking store. A file not logged (the stage killed, its run not
opened) stays for the relaunch, which resumes the same run folder and logs it to its own run."""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import threading
import time
from typing import Self

from pipeline.runtime.storage import make_folder
from pipeline.runtime.tracking import StageRun, log_metric_steps

SUFFIX = ".json"
# Epochs whose times set the pace: enough for a median that one stall does not move, few enough
# that the pace follows a job whose epochs slow down or speed up.
PACE_EPOCHS = 9


def write_epoch(folder_uri: str, metrics: dict) -> None:
    """Rank 0's side: one file per report, named to sort by epoch, then by when it was written
    (an epoch that a restarted worker group trains again is logged again, as it happened), and
    written under another name first, so that a file with the name is always whole."""
    import pyarrow.fs as pafs

    filesystem, folder = pafs.FileSystem.from_uri(folder_uri)
    make_folder(filesystem, folder)
    name = f"{folder}/{int(metrics['epoch']):06d}-{time.time_ns()}"
    with filesystem.open_output_stream(name + ".part") as out:
        out.write(json.dumps(metrics).encode())
    filesystem.move(name + ".part", name + SUFFIX)


def written_at_ms(path: str) -> int:
    """When rank 0 wrote an epoch file (its name says), as MLflow's metric timestamp."""
    return int(path.rsplit("-", 1)[1].removesuffix(SUFFIX)) // 1_000_000


def next_interval(written_ms: list[int], started_ms: int, now_ms: int, shortest: float, longest: float) -> float:
    """Seconds to the next sweep, within [shortest, longest]: the epochs' pace once the job has
    written two since the tail started (the lower median gap between them: a stall does not set
    it); until then as long again as no epoch has come, since the tail started or since the
    first epoch, so that the wait doubles through a job's start (seconds to minutes) and starts
    over at its first epoch. A relaunch's files from before the tail started set no pace."""
    ours = sorted(ms for ms in written_ms if ms >= started_ms)
    if len(ours) >= 2:
        seconds = statistics.median_low(b - a for a, b in itertools.pairwise(ours)) / 1000
    else:
        seconds = (now_ms - max([started_ms, *ours])) / 1000
    return min(max(seconds, shortest), longest)


class EpochLogTail:
    """The stage's side, around its job: a thread sweeps the folder at about the pace of the
    last `PACE_EPOCHS` epochs (`next_interval`, `shortest` to `longest` seconds apart: each
    sweep lists the folder, a paid request on an object store), logs the epoch files in it to
    the stage's MLflow `run` (once it is open), at step = epoch, and deletes them; leaving the
    block logs the rest. A sweep that fails is tried again at the next one, and the sweep after
    the job raises its error."""

    def __init__(self, folder_uri: str, run: StageRun, shortest: float = 1.0, longest: float = 60.0):
        import pyarrow.fs as pafs

        self.filesystem, self.folder = pafs.FileSystem.from_uri(folder_uri)
        self.run, self.shortest, self.longest = run, shortest, longest
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.sweep()
        except Exception:
            if exc_type is None:
                raise
            # The job's own error is the one to see; the files not logged stay for the relaunch.

    def _poll(self) -> None:
        said, interval, written, started_ms = False, self.shortest, [], time.time_ns() // 1_000_000
        while not self._stop.wait(interval):
            try:
                written = (written + self.sweep())[-PACE_EPOCHS:]
            except Exception as err:  # noqa: BLE001 -- tried again next time, raised by the sweep after the job
                if not said:
                    print(f"warning: this stage's epochs cannot reach its MLflow run yet ({err}); the stage fails "
                          "when its job ends unless that passes (Ctrl-C stops it now; a rerun resumes it)",
                          file=sys.stderr, flush=True)
                    said = True
            interval = next_interval(written, started_ms, time.time_ns() // 1_000_000, self.shortest, self.longest)

    def sweep(self) -> list[int]:
        """Log every epoch file in the folder, in order, then delete them; when each was written
        (`written_at_ms`)."""
        import pyarrow.fs as pafs

        found = self.filesystem.get_file_info(pafs.FileSelector(self.folder, allow_not_found=True))
        paths = sorted(info.path for info in found if info.path.endswith(SUFFIX))
        if not paths:
            return []
        epochs = []
        for path in paths:
            with self.filesystem.open_input_stream(path) as f:
                metrics = json.loads(f.read())
            epochs.append((int(metrics["epoch"]), written_at_ms(path), metrics))
        log_metric_steps(self.run.tracking_uri, self.run.opened_id(), epochs)
        for path in paths:  # logged: the next sweep, or a relaunch, must not log them again
            self.filesystem.delete_file(path)
        return [written_at_ms(path) for path in paths]
