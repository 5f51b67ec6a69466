import time
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from pipeline.runtime.epoch_log import EpochLogTail, write_epoch


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


def test_each_epoch_rank_0_writes_reaches_the_run_while_the_job_runs_and_the_rest_when_it_ends(run, tmp_path):
    uri, client, run_id = run
    folder = tmp_path / "storage" / "run" / "epochs"
    write_epoch(str(folder), 1, {"epoch": 1, "loss": 9.0})  # an earlier launch's: logged in its own run
    with EpochLogTail(str(folder), SimpleNamespace(tracking_uri=uri, run_id=run_id), interval=0.05):
        assert not folder.exists() or not any(folder.iterdir())
        write_epoch(str(folder), 1, {"epoch": 1, "loss": 2.0})
        deadline = time.time() + 10
        while not history(client, run_id, "loss") and time.time() < deadline:
            time.sleep(0.05)
        assert history(client, run_id, "loss") == [(1, 2.0)]  # logged by the thread, the job still running
        (folder / "000002-1.json").write_text('{"epoch": 2, "lo')  # a file still being written
        write_epoch(str(folder), 3, {"epoch": 3, "loss": 0.5})
        time.sleep(0.3)
        assert history(client, run_id, "loss") == [(1, 2.0)]  # in order: epoch 3 waits for epoch 2
        (folder / "000002-1.json").write_text('{"epoch": 2, "loss": 1.0, "resumed_at_epoch": 1}')
    assert history(client, run_id, "loss") == [(1, 2.0), (2, 1.0), (3, 0.5)]
    assert history(client, run_id, "resumed_at_epoch") == [(2, 1.0)]


def test_the_jobs_own_error_is_the_one_raised_when_the_last_sweep_fails_too(run, tmp_path):
    uri, _, _ = run
    folder, missing = tmp_path / "epochs", SimpleNamespace(tracking_uri=uri, run_id="no-such-run")
    with pytest.raises(RuntimeError, match="the job failed"), EpochLogTail(str(folder), missing, interval=60):
        write_epoch(str(folder), 1, {"epoch": 1, "loss": 2.0})
        raise RuntimeError("the job failed")
    # Without it, the tracking store's error is raised.
    with pytest.raises(Exception, match="no-such-run"), EpochLogTail(str(folder), missing, interval=60):
        write_epoch(str(folder), 1, {"epoch": 1, "loss": 2.0})
