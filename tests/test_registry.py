"""The registered student: `champion` follows the best val mIoU, and the registered model
predicts exactly what the exported weights do, in a fresh process."""

import subprocess
import sys
import warnings

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline.models.checkpoints import SEGMENTER, save_weights
from pipeline.config.params import ModelConfig
from pipeline.models.transunet import build_network
from pipeline.predict import load_predictor
from pipeline.infer.registry import register_segmenter

CLASSES = ["background", "disc", "bar"]


def test_champion_moves_only_to_a_better_model_and_loads_in_a_fresh_process(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri()))
    torch.manual_seed(0)
    weights = tmp_path / "student.pt"
    save_weights(weights, build_network(ModelConfig(), len(CLASSES)).state_dict(), SEGMENTER, ModelConfig(), CLASSES)
    results = []
    for miou in (0.5, 0.4, 0.6):
        with mlflow.start_run():
            results.append(register_segmenter(weights, 32, CLASSES, "seg", miou))
    assert results == [("1", True), ("2", False), ("3", True)]
    assert str(MlflowClient(uri).get_model_version_by_alias("seg", "champion").version) == "3"
    other = tmp_path / "other.pt"  # another class list: not comparable, so it takes the alias
    save_weights(other, build_network(ModelConfig(), 2).state_dict(), SEGMENTER, ModelConfig(), ["bg", "x"])
    with mlflow.start_run():
        assert register_segmenter(other, 32, ["bg", "x"], "seg", 0.1) == ("4", True)
    with mlflow.start_run():
        assert register_segmenter(weights, 32, CLASSES, "seg", 0.55) == ("5", True)

    images = np.random.default_rng(0).integers(0, 256, (2, 40, 72, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    script = (
        "import numpy as np, mlflow, sys\n"
        f"images = np.load({str(tmp_path / 'images.npy')!r})\n"
        "model = mlflow.pyfunc.load_model('models:/seg@champion')\n"
        f"np.save({str(tmp_path / 'pyfunc.npy')!r}, model.predict(images))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, )
    expected = np.stack([p.labels for p in load_predictor(str(weights), 32, "cpu", 16).predict(list(images))])
    assert np.array_equal(np.load(tmp_path / "pyfunc.npy"), expected)

    # predict reads the registered model's weights and MLmodel only: its pickle is never loaded.
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda *a, **k: pytest.fail("predict unpickled the model"))
    version = MlflowClient(uri).get_model_version("seg", "5")
    assert version.source.startswith("models:/m-")
    for model_uri in ("models:/seg@champion", "models:/seg/5", f"runs:/{version.run_id}/student",
                      version.source):  # MLflow 3's logged-model URI (models:/m-<id>), as log_model returns it
        predictor = load_predictor(model_uri, None, "cpu", 16)
        assert (predictor.classes, predictor.image_size) == (CLASSES, 32)
        assert np.array_equal(np.stack([p.labels for p in predictor.predict(list(images))]), expected)


def test_a_registered_version_points_back_to_its_run_and_commit_and_the_run_lists_the_model(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    weights = tmp_path / "student.pt"
    save_weights(weights, build_network(ModelConfig(), len(CLASSES)).state_dict(), SEGMENTER, ModelConfig(), CLASSES)
    with mlflow.start_run(experiment_id=experiment, tags={"git.commit": "c0ffee"}) as run, \
            warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        number, _ = register_segmenter(weights, 32, CLASSES, "seg", 0.5)
    # evaluate's output keeps none of MLflow's advice (an input example, predict's type hints)
    assert not [w for w in said if issubclass(w.category, UserWarning)], [str(w.message) for w in said]
    client = MlflowClient(uri)
    version = client.get_model_version("seg", number)
    assert version.run_id == run.info.run_id and version.tags["git.commit"] == "c0ffee"
    assert any((tmp_path / "art").rglob("input_example.json"))  # a served model has an example to start from
    logged = client.search_logged_models(experiment_ids=[experiment])
    assert [m.source_run_id for m in logged] == [run.info.run_id]  # the runs table's Models column
