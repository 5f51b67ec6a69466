"""The student as an MLflow model: a pyfunc that wraps the preprocessing and the network,
registered under a name, with the `champion` alias kept on the best val mIoU so far."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np

CHAMPION = "champion"
MIOU_TAG = "val_miou"
CLASSES_TAG = "classes"


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """Input: a batch of H×W×3 uint8 images (one size per call); output: N×H×W uint8 class ids.
    `unwrap_python_model().predictor` gives `pipeline.predict`'s Predictor, for any sizes."""

    def load_context(self, context) -> None:
        from pipeline.checkpoints import load_exported_segmenter
        from pipeline.predict import Predictor

        net, classes = load_exported_segmenter(Path(context.artifacts["weights"]))
        self.predictor = Predictor(net, classes, int(context.model_config["image_size"]),
                                   data_format=context.model_config.get("format", ""))

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
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
        name="student", python_model=SegmentationModel(), artifacts={"weights": str(weights)},
        model_config={"image_size": image_size, "classes": classes, "format": data_format}, signature=_signature(),
        code_paths=[str(Path(__file__).resolve().parent)], registered_model_name=name,
        pip_requirements=[f"{pkg}=={version(pkg)}" for pkg in ("torch", "torchvision", "timm", "numpy", "pillow",
                                                                "pyarrow", "omegaconf", "pyyaml", "tqdm", "mlflow")])
    client = MlflowClient()
    number = str(info.registered_model_version)
    client.set_model_version_tag(name, number, MIOU_TAG, f"{miou:.6f}")
    client.set_model_version_tag(name, number, CLASSES_TAG, ",".join(classes))
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
