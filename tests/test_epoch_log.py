import itertools
import time
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from pipeline.runtime.epoch_log import EpochLogTail, next_interval, write_epoch


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("epochs")


@pytest.fixture
def run(store):
    uri, client, experiment = store
    return uri, client, client.create_run(experiment).info.run_id


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def wait_for(condition, seconds=10):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


def test_each_epoch_rank_0_writes_reaches_the_run_while_the_job_runs_and_the_rest_when_it_ends(run, tmp_path):
    uri, client, run_id = run
    folder = tmp_path / "storage" / "run" / "epochs"
    write_epoch(str(folder), {"epoch": 1, "loss": 2.0})  # left by a launch killed before it logged it
    with EpochLogTail(str(folder), SimpleNamespace(tracking_uri=uri, opened_id=lambda: run_id), shortest=0.05):
        assert wait_for(lambda: history(client, run_id, "loss") == [(1, 2.0)])  # while the job runs
        assert not any(folder.iterdir())  # logged files are gone: never logged twice
        (folder / "000002-1.part").write_text('{"epoch": 2, "lo')  # being written: never read
        write_epoch(str(folder), {"epoch": 2, "loss": 1.0, "resumed_at_epoch": 1})
        write_epoch(str(folder), {"epoch": 3, "loss": 0.5})
    assert history(client, run_id, "loss") == [(1, 2.0), (2, 1.0), (3, 0.5)]
    assert history(client, run_id, "resumed_at_epoch") == [(2, 1.0)]
    assert [p.name for p in folder.iterdir()] == ["000002-1.part"]


def test_a_failed_sweep_is_tried_again_and_loses_no_epoch(run, tmp_path, monkeypatch, capsys):
    uri, client, run_id = run
    folder = tmp_path / "epochs"
    calls = []
    real = MlflowClient.log_batch

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("tracking server restarting")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", flaky)
    with EpochLogTail(str(folder), SimpleNamespace(tracking_uri=uri, opened_id=lambda: run_id), shortest=0.05):
        write_epoch(str(folder), {"epoch": 1, "loss": 2.0})
        assert wait_for(lambda: history(client, run_id, "loss") == [(1, 2.0)])
    assert "cannot reach its MLflow run yet (tracking server restarting)" in capsys.readouterr().err
    assert history(client, run_id, "loss") == [(1, 2.0)]


def test_the_jobs_own_error_is_the_one_raised_when_the_last_sweep_fails_too(run, tmp_path):
    uri, _, _ = run
    folder, missing = tmp_path / "epochs", SimpleNamespace(tracking_uri=uri, opened_id=lambda: "no-such-run")
    with pytest.raises(RuntimeError, match="the job failed"), EpochLogTail(str(folder), missing, shortest=60):
        write_epoch(str(folder), {"epoch": 1, "loss": 2.0})
        raise RuntimeError("the job failed")
    assert len(list(folder.iterdir())) == 1  # kept for the relaunch
    # Without it, the tracking store's error is raised.
    with pytest.raises(Exception, match="no-such-run"), EpochLogTail(str(folder), missing, shortest=60):
        pass


def test_the_folder_is_listed_at_about_the_epochs_pace_not_every_second():
    """Each sweep lists the folder: a paid request on an object store."""
    start = 1_000_000  # ms, when the tail started
    # The job starting: as long again as nothing has come, up to a minute.
    assert [next_interval([], start, start + ms, 1, 60) for ms in (500, 2_000, 32_000, 90_000)] == [1, 2, 32, 60]
    # Its first epoch in: the wait starts over from it.
    assert next_interval([start + 64_000], start, start + 66_000, 1, 60) == 2
    assert next_interval([start, start + 20_000, start + 40_000], start, start + 41_000, 1, 60) == 20  # 20-s epochs
    stalled = [start, start + 20_000, start + 40_000, start + 400_000, start + 420_000]
    assert next_interval(stalled, start, start + 421_000, 1, 60) == 20  # a stall sets no pace
    # A relaunch's file from before the tail started sets no pace either.
    assert next_interval([start - 3_600_000, start + 15_000], start, start + 16_000, 1, 60) == 1
    assert next_interval([start, start + 300, start + 600], start, start + 700, 1, 60) == 1  # faster than the shortest
    assert next_interval([start, start + 3_600_000], start, start + 3_600_500, 1, 60) == 60  # hour-long epochs


def test_the_tail_sweeps_less_often_while_no_epoch_arrives(tmp_path, monkeypatch):
    sweeps = []
    monkeypatch.setattr(EpochLogTail, "sweep", lambda self: sweeps.append(time.monotonic()) or [])
    with EpochLogTail(str(tmp_path / "epochs"), SimpleNamespace(tracking_uri=None, opened_id=lambda: "unused"),
                      shortest=0.05):
        time.sleep(1.7)  # the wait doubling from 0.05 s: sweeps at 0.05, 0.1, 0.2, 0.4, 0.8, 1.6 s
    # Those and the one on leaving (34 at a fixed 0.05 s); a busy machine only delays them.
    assert 3 <= len(sweeps) <= 7
    gaps = [b - a for a, b in itertools.pairwise(sweeps[:-1])]
    assert all(gap >= 0.05 * 2**i * 0.99 for i, gap in enumerate(gaps))
