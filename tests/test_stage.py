"""What every stage shares: errors become one line and exit 1, nothing secret is logged."""

import errno

import pytest
import yaml

from pipeline.stage import stage


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
        run_id = ctx.run_id
    client = MlflowClient()
    run = client.get_run(run_id)
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    logged = [*run.data.params.items(), *run.data.tags.items(), *parent.data.params.items(), *parent.data.tags.items()]
    assert len(parent.data.params) > 100  # the whole params.yaml
    assert not [(k, v) for k, v in logged for secret in secrets.values() if secret in f"{k}={v}"]
