import subprocess
from pathlib import Path

from pipeline.config.params import MlflowConfig
from pipeline.runtime.tracking import (
    EXECUTION_TAG,
    PARENT_TAG,
    execution_id,
    flatten,
    git_commit,
    resolve_tracking_uri,
)


def test_the_run_tags_keep_their_names():
    """Tags recorded in users' MLflow stores: a rename would orphan every earlier execution."""
    assert (EXECUTION_TAG, PARENT_TAG) == ("pipeline.execution", "pipeline.parent")


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(MlflowConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri(MlflowConfig(tracking_uri="http://x:5000"), tmp_path) == "http://x:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(MlflowConfig(tracking_uri="http://x:5000"), Path(".")) == "http://env:5000"


def test_execution_id_override_and_stability(monkeypatch):
    monkeypatch.setenv("PIPELINE_EXECUTION_ID", "run-42")
    assert execution_id() == "run-42"
    monkeypatch.delenv("PIPELINE_EXECUTION_ID")
    assert execution_id() != "run-42"


def test_flatten_prefixes_sections():
    assert flatten("data", {"seed": 0, "digits": {"train_scenes": 5}}) == {"data.seed": 0,
                                                                           "data.digits.train_scenes": 5}


def test_git_commit_is_dirty_for_code_edits_but_not_for_the_pipelines_own_lock_files(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "study").mkdir()
    for name in ("dvc.lock", "study/dvc.lock", "study/plan.yaml", "code.py"):
        (tmp_path / name).write_text("a\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "x")
    commit = git_commit(tmp_path)
    assert len(commit) == 40
    for name in ("dvc.lock", "study/dvc.lock", "study/plan.yaml"):
        (tmp_path / name).write_text("b\n")
    assert git_commit(tmp_path) == commit
    (tmp_path / "code.py").write_text("b\n")
    assert git_commit(tmp_path) == commit + "-dirty"
