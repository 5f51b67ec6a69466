"""The student as an MLflow model: a pyfunc that wraps the preprocessing and the network,
registered under a name, with the `champion` alias kept on the best val mIoU so far.

The pyfunc is for `mlflow models serve`. `pipeline.predict` reads a logged model with
`load_logged_segmenter` instead: loading the pyfunc unpickles its python_model.pkl, which runs
whatever code the model's author put in it."""

from __future__ import annotations

import re
import tempfile
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np

from pipeline.models.checkpoints import CheckpointError

if TYPE_CHECKING:
    from pipeline.models.transunet import SegmentationNet

CHAMPION = "champion"
MIOU_TAG = "val_miou"
CLASSES_TAG = "classes"
WEIGHTS = "weights"  # the artifact key of the exported weights in the logged pyfunc


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """Input: a batch of H×W×3 uint8 images (one size per call); output: N×H×W uint8 class ids.
    `unwrap_python_model().predictor` gives its `pipeline.infer.predictor.Predictor`, for any sizes."""

    def load_context(self, context) -> None:
        from pipeline.infer.predictor import Predictor
        from pipeline.models.checkpoints import load_exported_segmenter

        net, classes = load_exported_segmenter(Path(context.artifacts[WEIGHTS]))
        self.predictor = Predictor(net, classes, int(context.model_config["image_size"]),
                                   data_format=context.model_config.get("format", ""))

    def predict(self, context, model_input: np.ndarray, params: dict[str, str] | None = None) -> np.ndarray:
        return np.stack([p.labels for p in self.predictor.predict(list(np.asarray(model_input, dtype=np.uint8)))])


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]))


def register_segmenter(weights: Path, image_size: int, classes: list[str], name: str, miou: float,
                       data_format: str = "") -> tuple[str, bool]:
    """Log `weights` as a pyfunc model in the active run, register it as a new version of
    `name`, and move `champion` to it only when its val mIoU beats the current champion's
    (a champion with another class list is not comparable and is replaced).
    Returns (version, whether it became champion)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    info = mlflow.pyfunc.log_model(
        name="student", python_model=SegmentationModel(), artifacts={WEIGHTS: str(weights)},
        model_config={"image_size": image_size, "classes": classes, "format": data_format}, signature=_signature(),
        # One black image for `mlflow models serve` users to start from (and MLflow checks it runs).
        input_example=np.zeros((1, image_size, image_size, 3), dtype=np.uint8),
        code_paths=[str(Path(__file__).resolve().parents[1])], registered_model_name=name,
        pip_requirements=[f"{pkg}=={version(pkg)}" for pkg in ("torch", "torchvision", "timm", "numpy", "pillow",
                                                                "pyarrow", "omegaconf", "pyyaml", "tqdm", "mlflow")])
    client = MlflowClient()
    number = str(info.registered_model_version)
    client.set_model_version_tag(name, number, MIOU_TAG, f"{miou:.6f}")
    client.set_model_version_tag(name, number, CLASSES_TAG, ",".join(classes))
    run = mlflow.active_run()
    if run is not None and "git.commit" in run.data.tags:  # the version's run_id is this run already
        client.set_model_version_tag(name, number, "git.commit", run.data.tags["git.commit"])
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
        comparable = champion.tags.get(CLASSES_TAG) == ",".join(classes)
        best = float(champion.tags.get(MIOU_TAG, "-inf")) if comparable else float("-inf")
    except MlflowException:  # no champion yet
        best = float("-inf")
    promoted = miou > best
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, number)
    return number, promoted


def load_logged_segmenter(uri: str) -> tuple[SegmentationNet, list[str], int, str]:
    """(network, classes, image size, data format) of a model that `register_segmenter` logged,
    from its MLmodel file (parsed with yaml.safe_load) and its weights artifact (read with
    weights_only=True) only: nothing of the model is unpickled or imported."""
    import yaml

    from pipeline.models.checkpoints import load_exported_segmenter

    with tempfile.TemporaryDirectory() as tmp:
        try:
            spec = yaml.safe_load(_artifact(uri, "MLmodel", tmp).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{uri}: MLmodel is not valid YAML ({str(err).splitlines()[0]})") from None
        except OSError as err:
            raise CheckpointError(f"{uri}: MLmodel cannot be read ({err.strerror or err})") from None
        try:
            flavor = spec["flavors"]["python_function"]
            weights, config = flavor["artifacts"][WEIGHTS]["path"], dict(flavor["config"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{uri}: MLmodel has no python_function weights artifact and config; "
                                  "expected a model logged by pipeline.infer.registry") from None
        relative = PurePosixPath(weights) if isinstance(weights, str) else None
        if relative is None or relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise CheckpointError(f"{uri}: MLmodel weights path {weights!r}: expected a path inside the model")
        size, data_format = config.get("image_size"), config.get("format", "")
        if type(size) is not int or size <= 0 or size % 16:
            raise CheckpointError(f"{uri}: MLmodel config image_size {size!r}: expected a positive multiple of 16")
        if not isinstance(data_format, str):
            raise CheckpointError(f"{uri}: MLmodel config format {data_format!r}: expected a format name")
        local = _artifact(uri, str(relative), tmp)
        try:
            net, classes = load_exported_segmenter(local)
        except CheckpointError as err:  # name the artifact, not its temp copy
            raise CheckpointError(str(err).replace(str(local), f"{uri}/{relative}")) from None
    if config.get("classes", classes) != classes:
        raise CheckpointError(f"{uri}: MLmodel config classes {config.get('classes')!r} differ from its "
                              f"weights' {classes}")
    return net, classes, size, data_format


def _artifact(uri: str, relative: str, tmp: str) -> Path:
    """A file of the model at `uri`: read in place when local, else downloaded into `tmp`."""
    parsed = urlparse(uri)
    folder = Path(uri) if Path(uri).is_dir() else Path(unquote(parsed.path)) \
        if parsed.scheme == "file" and parsed.netloc in ("", "localhost") else None if parsed.scheme else Path(uri)
    if folder is not None:
        if not (folder / "MLmodel").is_file():
            raise CheckpointError(f"{uri}: not an MLflow model (it has no MLmodel file)")
        return folder / relative
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:  # the model's own repository: `models:/m-<id>` (MLflow 3's logged models) has no path to append to
        return Path(get_artifact_repository(uri.rstrip("/")).download_artifacts(relative, dst_path=tmp))
    except Exception as err:  # noqa: BLE001 - each artifact store and the registry raise their own types
        # MLflow's message may list each failed file under a '##### File …' header: keep the reason.
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.startswith("#####")]
        reason = re.split(r"(?<=\.)\s", lines[-1])[0].rstrip(".") if lines else type(err).__name__
        raise CheckpointError(f"{uri}: {reason}") from None
