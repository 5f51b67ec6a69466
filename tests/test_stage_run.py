"""What every stage shares: errors become one line and exit 1, nothing secret is logged."""

import errno

import pytest
import yaml

from pipeline.config.params import ConfigError
from pipeline.orchestrate.stage_run import stage


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"mlflow": {"experiment": "t"}}))
    return tmp_path


def test_an_unwritable_output_is_one_line_and_exit_1(project, capsys):
    with pytest.raises(SystemExit) as exit_info, stage("prepare", ["data"]):
        raise OSError(errno.ENOSPC, "No space left on device", "data/prepared/part-00000.parquet")
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.splitlines()[-1]  # (MLflow may log its store's creation first)
    assert last == "error: cannot write data/prepared/part-00000.parquet: No space left on device"


def test_no_secret_from_the_environment_reaches_mlflow(project, monkeypatch):
    from mlflow import MlflowClient

    secrets = {"AWS_SECRET_ACCESS_KEY": "aws-secret-3f9a", "MLFLOW_TRACKING_TOKEN": "token-77c1",
               "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE42"}
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    with stage("teacher_finetune", ["teacher", "model", "ray", "mlflow"]) as ctx:
        run_id = ctx.active_run_id()
    client = MlflowClient()
    run = client.get_run(run_id)
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    logged = [*run.data.params.items(), *run.data.tags.items(), *parent.data.params.items(), *parent.data.tags.items()]
    assert len(parent.data.params) > 100  # the whole params.yaml
    assert not [(k, v) for k, v in logged for secret in secrets.values() if secret in f"{k}={v}"]


@pytest.mark.parametrize("running, expected", [
    ("student_train@round2", "student_train@round2"),       # a round of the main pipeline
    ("dvc.yaml:student_train@round2", "student_train@round2"),
    ("study/dvc.yaml:student@dsbn-f5-seed0-r1", "student_train"),  # another stage running this script
    ("", "student_train"),                                  # not run by DVC
])
def test_each_round_is_an_mlflow_run_of_its_own_name(project, monkeypatch, running, expected):
    from mlflow import MlflowClient

    monkeypatch.setenv("DVC_STAGE", running)
    with stage("student_train", ["student"]) as ctx:
        run_id = ctx.active_run_id()
    assert ctx.name == expected
    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == expected and run.data.tags["dvc.stage"] == expected
    parent = MlflowClient().get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags[f"stage.{expected.replace('@', '/')}"] == "ran"


def _raised_on_ray(error: Exception) -> list[Exception]:
    """`error` as a stage's driver gets it back from an actor, a task or a Ray Train worker."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    task_error = RayTaskError("predict_batch", "Traceback (most recent call last): ...", error)
    wrapped = RuntimeError("the dataset failed")
    wrapped.__cause__ = task_error.as_instanceof_cause()
    return [task_error, task_error.as_instanceof_cause(), wrapped, WorkerGroupError("training failed", {0: error})]


@pytest.mark.parametrize("case", range(4))
def test_our_error_raised_on_a_ray_worker_is_still_one_line_and_exit_1(project, capsys, case):
    from pipeline.data.shards import DataError

    with pytest.raises(SystemExit) as exit_info, stage("pseudo_label", ["pseudo"]):
        raise _raised_on_ray(DataError("image 'x': its stored bytes are not a PNG"))[case]
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1] == "error: image 'x': its stored bytes are not a PNG"


def test_a_bug_keeps_its_traceback(project):
    with pytest.raises(ZeroDivisionError), stage("prepare", ["data"]):
        1 / 0


def test_our_own_error_keeps_every_line_of_its_message(project, capsys):
    """Only an error unwrapped from Ray is cut to its first line; a YAML error's position stays."""
    (project / "params.yaml").write_text("teacher:\n  lr: [0.1\n")
    with pytest.raises(SystemExit), stage("prepare", ["data"]):
        pass
    err = capsys.readouterr().err
    assert "error: params.yaml: not valid YAML" in err and "line 3" in err


def test_modules_imported_meanwhile_arrive_without_the_stage_importing_them(monkeypatch):
    import sys
    import time

    from pipeline.runtime.meanwhile import import_meanwhile

    monkeypatch.delitem(sys.modules, "wave", raising=False)
    import_meanwhile("wave")
    deadline = time.time() + 30
    while "wave" not in sys.modules and time.time() < deadline:
        time.sleep(0.05)
    assert "wave" in sys.modules  # started by the thread alone
    import wave  # waits for the thread's import to finish

    assert wave.open


def test_a_stage_with_no_job_to_wait_on_has_its_run_and_imports_when_while_job_starts_returns(project, monkeypatch):
    """The benchmark's plain baseline (`while_job_starts(wait=True)`): nothing left on a thread
    beside its training."""
    import sys

    import mlflow

    monkeypatch.delitem(sys.modules, "wave", raising=False)
    with stage("teacher_finetune", ["teacher"]) as ctx:
        ctx.while_job_starts("wave", wait=True)
        assert "wave" in sys.modules
        run_id = ctx.run.opened_id()
        assert mlflow.MlflowClient(ctx.run.tracking_uri).get_run(run_id).info.status == "RUNNING"
        assert mlflow.active_run() is None  # opened, not made MLflow's active run
        assert ctx.active_run_id() == run_id
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_a_run_opened_with_the_job_is_opened_meanwhile_active_after_it_and_failed_when_the_stage_fails(project):
    import mlflow
    from mlflow import MlflowClient

    with stage("teacher_finetune", ["teacher"]) as ctx:
        assert mlflow.active_run() is None  # nothing opened before the job
        ctx.while_job_starts()  # what a stage does right before its job blocks
        run_id = ctx.run.opened_id()  # waits for the thread
        assert mlflow.active_run() is None
        assert ctx.active_run_id() == run_id == mlflow.active_run().info.run_id  # active for the stage's own log calls
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["wall_s"] > 0
    # Opened late, it still starts when the stage's process did: the UI's Duration is the stage's.
    assert run.info.start_time == pytest.approx(ctx.started_at * 1000, abs=1)
    assert run.data.params["teacher.epochs"]
    # A stage that fails before its job still leaves a FAILED run on record.
    with pytest.raises(SystemExit), stage("student_train", ["student"]):
        raise ConfigError("student.epochs: expected a positive integer")
    failed = MlflowClient().search_runs([run.info.experiment_id], "attributes.run_name = 'student_train'")
    assert [r.info.status for r in failed] == ["FAILED"]


def test_an_unreachable_tracking_server_is_said_before_the_job_and_promptly(project, monkeypatch, capsys):
    import socket
    import time

    with socket.socket() as free:  # a port nothing listens on once closed
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{port}")
    started = time.time()
    with pytest.raises(SystemExit), stage("teacher_finetune", ["teacher"]):
        pytest.fail("the stage's work started")
    assert time.time() - started < 15  # the failed stage does not try the server again on its way out
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"error: the MLflow tracking server http://127.0.0.1:{port} (mlflow.tracking_uri or MLFLOW_TRACKING_URI) "
        "cannot be reached: ")


def test_logging_to_mlflow_before_asking_for_the_run_is_a_bug_said_by_name(project):
    import mlflow

    with pytest.raises(RuntimeError, match="evaluate: the stage logged to MLflow before"), stage("evaluate", ["evaluate"]):
        mlflow.log_metric("x", 1.0)  # MLflow starts a run of its own for this
    assert mlflow.active_run() is None  # ended, not left for whatever runs next in the process
