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


def test_the_experiment_opens_on_model_training_unless_its_kind_was_chosen(tmp_path):
    from mlflow import MlflowClient

    from pipeline.runtime.tracking import EXPERIMENT_KIND, _experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    made = _experiment_id(client, "new", tmp_path, uri)
    assert client.get_experiment(made).tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    older = client.create_experiment("older")  # made before the tag existed
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND[0]: "genai_development"})
    assert _experiment_id(client, "older", tmp_path, uri) == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND[0]] == "custom_model_development"
    _experiment_id(client, "chosen", tmp_path, uri)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND[0]] == "genai_development"


def test_the_runs_page_link_opens_a_shared_view_with_the_scores_as_columns(tmp_path):
    import json

    from mlflow import MlflowClient

    from pipeline.runtime.tracking import VIEW_KEY, _experiment_id, runs_page

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    made = _experiment_id(client, "e", tmp_path, uri)
    client.set_experiment_tag(made, f"mlflow.sharedViewState.{VIEW_KEY}", "{}")  # an older view: replaced
    _experiment_id(client, "e", tmp_path, uri)
    view = json.loads(client.get_experiment(made).tags[f"mlflow.sharedViewState.{VIEW_KEY}"])
    assert {"metrics.`student_miou`", "metrics.`teacher_miou`", "attributes.`Dataset`"} <= set(view["selectedColumns"])
    assert runs_page(uri, made) == (f"http://127.0.0.1:5000/#/experiments/{made}/runs"
                                    f"?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning")
    assert runs_page("https://mlflow.example/", "7").startswith("https://mlflow.example/#/experiments/7/runs?")


def test_the_prepared_data_is_a_dataset_input_of_the_stage_and_once_of_its_parent(tmp_path):
    import mlflow

    from pipeline.runtime.tracking import log_prepared_data

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("e")
    parent = client.create_run(experiment).info.run_id
    manifest = {"format": "shapes", "labeled_fraction": 0.05, "counts": {"labeled": 100}}
    stages = []
    for digest in ("aaaa", "aaaa", "bbbb"):  # two stages on the same data, then the data changed
        with mlflow.start_run(experiment_id=experiment, tags={"mlflow.parentRunId": parent}) as run:
            log_prepared_data(tmp_path / "prepared", manifest, digest)
        stages.append(run.info.run_id)
    inputs = client.get_run(stages[0]).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("shapes (0.05 labeled)", "aaaa")]
    assert (tmp_path / "prepared").resolve().as_uri() in inputs[0].dataset.source
    assert [t.value for t in inputs[0].tags] == ["train"]
    assert sorted(d.dataset.digest for d in client.get_run(parent).inputs.dataset_inputs) == ["aaaa", "bbbb"]
    log_prepared_data(tmp_path / "prepared", manifest, "cccc")  # no active run: nothing to log to
    mlflow.set_tracking_uri(None)
