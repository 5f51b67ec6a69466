"""Each epoch's metrics, from rank 0 of a training job to the stage's MLflow run.

Rank 0 writes each epoch's metrics as one small JSON file into the job's run folder under
`ray.storage_path` (`<run>/epochs/`), beside its checkpoints; the stage's process, which waits on
the job (and opens its MLflow run meanwhile), logs each new file to the run from a thread, and
whatever is left once the job is back. So the workers never import MLflow (its import and its
store's first connection took 1.3-1.9 s here, on a worker's path between its first epoch and that
epoch's report), and they reach only the storage their checkpoints go to, never the tracking
store."""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from pipeline.runtime.tracking import StageRun


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def write_epoch(folder_uri: str, epoch: int, metrics: dict) -> None:
    """Rank 0's side: one file per report, named to sort by epoch, then by when (an epoch that a
    restarted worker group trains again is logged again, as it happened)."""
    import pyarrow.fs as pafs

    filesystem, folder = _filesystem(folder_uri)
    if isinstance(filesystem, pafs.LocalFileSystem):  # object stores have no folders
        filesystem.create_dir(folder, recursive=True)
    with filesystem.open_output_stream(f"{folder}/{epoch:06d}-{time.time_ns()}.json") as out:
        out.write(json.dumps(metrics).encode())


class EpochLogTail:
    """The stage's side, around its job: every `interval` seconds a thread logs the epoch files
    not logged yet to the stage's MLflow `run` (once it is open), at step = epoch; leaving the
    block logs the rest. The folder is emptied first: an earlier launch's epochs are in that
    launch's own run."""

    def __init__(self, folder_uri: str, run: StageRun, interval: float = 1.0):
        self.filesystem, self.folder = _filesystem(folder_uri)
        self.run, self.interval = run, interval
        self.logged: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Self:
        self.filesystem.delete_dir_contents(self.folder, missing_dir_ok=True)
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
            # The job's own error is the one to see; the epochs it reported are logged up to here.

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 -- the sweep after the job tries again and raises it
                return

    def sweep(self) -> None:
        """Log every complete epoch file not logged yet, in order."""
        import pyarrow.fs as pafs
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        found = self.filesystem.get_file_info(pafs.FileSelector(self.folder, allow_not_found=True))
        batch, stamp = [], int(time.time() * 1000)
        for path in sorted(info.path for info in found if info.path.endswith(".json") and info.path not in self.logged):
            with self.filesystem.open_input_stream(path) as f:
                try:
                    metrics = json.loads(f.read())
                except ValueError:  # still being written; read whole by a later sweep
                    break
            self.logged.add(path)
            batch += [Metric(key, float(value), stamp, int(metrics["epoch"])) for key, value in metrics.items()]
        client = MlflowClient(self.run.tracking_uri)
        for start in range(0, len(batch), 1000):  # MLflow's most metrics per batch
            client.log_batch(self.run.run_id, metrics=batch[start:start + 1000])
