"""Segment new images with a trained model.

    python -m pipeline.predict photos/ --model models/student.pt --out predictions/
    python -m pipeline.predict 'shots/*.jpg' --model models:/segmentation-student@champion --out pred/ --confidence

For each image, writes `<stem>.png` (class indices, with a colour palette so viewers show
colours), `<stem>_overlay.jpg` (the colours over the image) and, with `--confidence`,
`<stem>_confidence.png` (the top class's probability × 255). Images of any size are
resized so the shorter side is the model's training size, cut into the same squares that
`data.fit: tiles` makes, predicted in batches, and the class probabilities stitched back
and resized to the original size. Progress goes to stderr, the written mask paths to stdout.
"""

from __future__ import annotations

import argparse
import glob
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data import DataError
from pipeline.formats import IMAGE_SUFFIXES, palette_for, read_image, square_layout, squares


@dataclass
class Prediction:
    labels: np.ndarray  # H×W uint8 class ids
    confidence: np.ndarray  # H×W float32, the top class's probability


class Predictor:
    """A segmentation network with the preprocessing it was trained with."""

    def __init__(self, net, classes: list[str], image_size: int, device: str = "cpu", batch_size: int = 16,
                 data_format: str = ""):
        self.net = net.to(device).eval()
        self.classes, self.image_size, self.device, self.batch_size = classes, image_size, device, batch_size
        self.palette = palette_for({"format": data_format, "num_classes": len(classes)})

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """H×W×3 uint8 images of any sizes → one Prediction each, at the image's own size."""
        import torch

        from pipeline.inference import probabilities

        layouts, tiles = [], []
        for image in images:
            layouts.append(square_layout(image.shape[1], image.shape[0], self.image_size, "tiles"))
            tiles += squares(Image.fromarray(image), self.image_size, "tiles", Image.BILINEAR)
        batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
        probs = torch.cat([probabilities(self.net, batch[i:i + self.batch_size].to(self.device), flip_tta=False).cpu()
                           for i in range(0, len(batch), self.batch_size)])
        out, k = [], 0
        for image, ((nw, nh), boxes) in zip(images, layouts):
            total = torch.zeros(len(self.classes), nh, nw)
            count = torch.zeros(1, nh, nw)
            for left, top, right, bottom in boxes:
                total[:, top:bottom, left:right] += probs[k]
                count[:, top:bottom, left:right] += 1
                k += 1
            full = torch.nn.functional.interpolate((total / count)[None], size=image.shape[:2], mode="bilinear",
                                                   align_corners=False)[0]
            confidence, labels = full.max(0)
            out.append(Prediction(labels.to(torch.uint8).numpy(), confidence.numpy()))
        return out


def load_predictor(model: str, image_size: int | None, device: str, batch_size: int) -> Predictor:
    """A predictor from an exported weights file (a stage output such as models/student.pt)
    or an MLflow model URI (`models:/<name>@champion`, `runs:/<id>/student`)."""
    if is_mlflow_uri(model):
        import mlflow

        if Path("params.yaml").is_file():  # the project's own tracking store, as its stages use it
            from pipeline.config import load_params
            from pipeline.tracking import resolve_tracking_uri

            mlflow.set_tracking_uri(resolve_tracking_uri(load_params("params.yaml").mlflow, Path.cwd()))
        predictor = mlflow.pyfunc.load_model(model).unwrap_python_model().predictor
        predictor.net.to(device)
        predictor.device, predictor.batch_size = device, batch_size
        if image_size is not None:
            predictor.image_size = image_size
        return predictor
    from pipeline.checkpoints import load_exported_segmenter

    net, classes = load_exported_segmenter(Path(model))
    if image_size is None:
        raise DataError(f"{model}: give --image-size, the data.image_size the model was trained at "
                        "(read from ./params.yaml when it exists)")
    return Predictor(net, classes, image_size, device, batch_size)


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Image files from paths, folders (their images, not recursive) and glob patterns."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True)
                             if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise DataError(f"{item}: no such image, folder, or glob match")
            found += matches
    if not found:
        raise DataError(f"{', '.join(inputs)}: no images found (expected {sorted(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for path in found:
        if path.stem in stems and stems[path.stem] != path:
            raise DataError(f"{path}: same name as {stems[path.stem]}; outputs are named by file stem")
        stems[path.stem] = path
    return list(stems.values())


def write_outputs(out_dir: Path, stem: str, image: np.ndarray, pred: Prediction, palette: np.ndarray,
                  confidence: bool) -> Path:
    mask = Image.fromarray(pred.labels, mode="L").convert("P")
    mask.putpalette(palette.ravel().tolist())
    mask.putdata(pred.labels.ravel().tolist())  # keep the indices exactly
    mask_path = out_dir / f"{stem}.png"
    mask.save(mask_path)
    overlay = (0.5 * image + 0.5 * palette[pred.labels]).astype(np.uint8)
    Image.fromarray(overlay).save(out_dir / f"{stem}_overlay.jpg", quality=90)
    if confidence:
        Image.fromarray((pred.confidence * 255).round().astype(np.uint8)).save(out_dir / f"{stem}_confidence.png")
    return mask_path


def default_image_size() -> int | None:
    if not Path("params.yaml").is_file():
        return None
    from pipeline.config import load_params

    return load_params("params.yaml").data.image_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--model", required=True,
                        help="exported weights (e.g. models/student.pt) or an MLflow URI (models:/<name>@champion)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the masks and overlays")
    parser.add_argument("--classes", help="comma-separated class names the masks must use; "
                                          "a model with another class list is refused")
    parser.add_argument("--image-size", type=int, default=None,
                        help="shorter side the model was trained at (default: from the MLflow model, "
                             "else data.image_size of ./params.yaml)")
    parser.add_argument("--confidence", action="store_true", help="also write per-pixel confidence PNGs")
    parser.add_argument("--batch-size", type=int, default=16, help="squares per forward pass")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from pipeline.checkpoints import CheckpointError
    from pipeline.config import ConfigError

    try:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        paths = collect_inputs(args.inputs)
        predictor = load_predictor(args.model, args.image_size or default_image_size_for(args.model), device,
                                   args.batch_size)
        if args.classes is not None:
            wanted = [c.strip() for c in args.classes.split(",")]
            if wanted != predictor.classes:
                raise CheckpointError(f"{args.model}: predicts classes {predictor.classes}, not the requested {wanted}")
        args.out.mkdir(parents=True, exist_ok=True)
        with tqdm(total=len(paths), desc="predict", unit="img", file=sys.stderr) as bar:
            for start in range(0, len(paths), args.batch_size):
                chunk = paths[start:start + args.batch_size]
                images = [np.asarray(read_image(p)) for p in chunk]
                for path, image, pred in zip(chunk, images, predictor.predict(images)):
                    print(write_outputs(args.out, path.stem, image, pred, predictor.palette, args.confidence), flush=True)
                bar.update(len(chunk))
    except (DataError, CheckpointError, ConfigError) as err:
        sys.exit(f"error: {err}")


def is_mlflow_uri(model: str) -> bool:
    return "://" in model or model.startswith(("models:/", "runs:/"))


def default_image_size_for(model: str) -> int | None:
    """MLflow models carry their own size; a weights file takes ./params.yaml's."""
    return None if is_mlflow_uri(model) else default_image_size()


if __name__ == "__main__":
    main()
