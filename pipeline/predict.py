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
import os
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config.params import ConfigError
from pipeline.data.atomic import staged
from pipeline.data.formats import IMAGE_SUFFIXES, read_image
from pipeline.data.shards import DataError
from pipeline.infer.predictor import Prediction, Predictor


def load_predictor(model: str, image_size: int | None, device: str, batch_size: int) -> Predictor:
    """A predictor from an exported weights file (a stage output such as models/student.pt)
    or an MLflow model (`models:/<name>@champion`, `runs:/<id>/student`, a model folder). Of an
    MLflow model only the weights and the MLmodel metadata are read: see `registry`."""
    from pipeline.models.checkpoints import load_exported_segmenter

    if not is_mlflow_uri(model):
        net, classes = load_exported_segmenter(Path(model))
        if image_size is None:
            raise DataError(f"{model}: give --image-size, the data.image_size the model was trained at "
                            "(read from ./params.yaml when it exists)")
        return Predictor(net, classes, image_size, device, batch_size)
    import mlflow

    from pipeline.infer.registry import load_logged_segmenter

    if Path("params.yaml").is_file():  # the project's own tracking store, as its stages use it
        from pipeline.config.params import load_params
        from pipeline.runtime.tracking import resolve_tracking_uri

        mlflow.set_tracking_uri(resolve_tracking_uri(load_params("params.yaml").mlflow, Path.cwd()))
    net, classes, logged_size, data_format = load_logged_segmenter(model)
    return Predictor(net, classes, image_size or logged_size, device, batch_size, data_format)


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Image files from paths, folders (their images, not recursive) and glob patterns."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
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


def output_paths(out_dir: Path, stem: str, confidence: bool) -> list[Path]:
    """The mask, the overlay and (with --confidence) the confidence map of one image."""
    return [out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.jpg",
            *([out_dir / f"{stem}_confidence.png"] if confidence else [])]


def check_outputs(paths: list[Path], out_dir: Path, confidence: bool) -> None:
    """No output may overwrite an input (`--out` the input folder) or another image's output
    (`a.png` and `a_confidence.png` with --confidence)."""
    inputs = {p.resolve() for p in paths}
    owners: dict[Path, Path] = {}
    for path in paths:
        for output in output_paths(out_dir, path.stem, confidence):
            if output.resolve() in inputs:
                raise DataError(f"{output}: is an input image; writing its mask there would overwrite it "
                                "(give another --out)")
            if output in owners:
                raise DataError(f"{path}: its output {output.name} is also {owners[output]}'s; rename one of them")
            owners[output] = path


def write_outputs(out_dir: Path, stem: str, image: np.ndarray, pred: Prediction, palette: np.ndarray,
                  confidence: bool) -> Path:
    mask = Image.fromarray(pred.labels, mode="L").convert("P")
    mask.putpalette(palette.ravel().tolist())
    mask.putdata(pred.labels.ravel().tolist())  # keep the indices exactly
    overlay = Image.fromarray((0.5 * image + 0.5 * palette[pred.labels]).astype(np.uint8))
    pictures = [(mask, "PNG", {}), (overlay, "JPEG", {"quality": 90})]
    if confidence:
        pictures.append((Image.fromarray((pred.confidence * 255).round().astype(np.uint8)), "PNG", {}))
    paths = output_paths(out_dir, stem, confidence)
    try:
        for path, (picture, fmt, options) in zip(paths, pictures):
            with staged(path) as tmp:  # a full disk leaves no half-written picture...
                picture.save(tmp, format=fmt, **options)
    except BaseException:
        for path in paths:  # ...nor an image with only some of its outputs
            path.unlink(missing_ok=True)
        raise
    return paths[0]


def check_arguments(args: argparse.Namespace) -> str:
    """The cheap checks, before any model or image is read; returns the device to use."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: expected a positive integer")
    if args.image_size is not None and (args.image_size < 1 or args.image_size % 16):
        raise ConfigError(f"--image-size {args.image_size}: expected a positive multiple of 16 (the encoder's stride)")
    check_out(args.out)
    return check_device(args.device)


def check_device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: expected cpu, cuda or cuda:<index>")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def check_out(out: Path) -> None:
    """`--out` is a folder, or can be made as one: found before any work, made after it."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    existing = out.absolute()
    while not os.path.lexists(existing):  # the nearest part of the path that is there
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: cannot be created, {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write in {existing} (permission denied)")


def default_image_size() -> int | None:
    if not Path("params.yaml").is_file():
        return None
    from pipeline.config.params import load_params

    return load_params("params.yaml").data.image_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line and exit 1, as every failure
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--model", required=True,
                        help="exported weights (e.g. models/student.pt) or an MLflow model: a URI "
                             "(models:/<name>@champion, runs:/<id>/student) or a model folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the masks and overlays")
    parser.add_argument("--classes", help="comma-separated class names the masks must use; "
                                          "a model with another class list is refused")
    parser.add_argument("--image-size", type=int, default=None,
                        help="shorter side the model was trained at, a multiple of 16 (default: from the "
                             "MLflow model, else data.image_size of ./params.yaml)")
    parser.add_argument("--confidence", action="store_true", help="also write per-pixel confidence PNGs")
    parser.add_argument("--batch-size", type=int, default=16, help="squares per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:<index> (default: cuda when available)")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from pipeline.models.checkpoints import CheckpointError

    written = 0
    try:
        device = check_arguments(args)
        paths = collect_inputs(args.inputs)
        check_outputs(paths, args.out, args.confidence)
        predictor = load_predictor(args.model, args.image_size or default_image_size_for(args.model), device,
                                   args.batch_size)
        if args.classes is not None:
            wanted = [c.strip() for c in args.classes.split(",")]
            if wanted != predictor.classes:
                raise CheckpointError(f"{args.model}: predicts classes {predictor.classes}, not the requested {wanted}")
        for path in tqdm(paths, desc="check", unit="img", file=sys.stderr):
            read_image(path)  # every input decodes before anything is written
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            with tqdm(total=len(paths), desc="predict", unit="img", file=sys.stderr) as bar:
                for start in range(0, len(paths), args.batch_size):
                    chunk = paths[start:start + args.batch_size]
                    images = [np.asarray(read_image(p)) for p in chunk]
                    for path, image, pred in zip(chunk, images, predictor.predict(images)):
                        print(write_outputs(args.out, path.stem, image, pred, predictor.palette, args.confidence),
                              flush=True)
                        written += 1
                    bar.update(len(chunk))
        except OSError as err:  # a full disk, an unwritable folder
            raise DataError(f"{err.filename or args.out}: {err.strerror or err}") from None
    except (DataError, CheckpointError, ConfigError) as err:
        # Only a failure while writing (a full disk, an input changed since it was checked) leaves outputs.
        done = f"; the outputs of {written} of {len(paths)} images were written before it" if written else ""
        sys.exit(f"error: {err}{done}")


def is_mlflow_uri(model: str) -> bool:
    """A folder, or a URI (`models:/…`, `runs:/…`, `file://…`, `s3://…`) that is not a local
    file: an MLflow model. A path that exists is taken as a path, whatever its characters."""
    if Path(model).exists():
        return Path(model).is_dir()
    return bool(re.match(r"[A-Za-z][\w+.-]+:/", model))


def default_image_size_for(model: str) -> int | None:
    """MLflow models carry their own size; a weights file takes ./params.yaml's."""
    return None if is_mlflow_uri(model) else default_image_size()


if __name__ == "__main__":
    main()
