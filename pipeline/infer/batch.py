"""Batch inference for `pseudo_label` and `evaluate`: a Ray Data pipeline, and the same work
as a plain in-process loop.

    read_parquet -> map_batches(SegmenterReplica, a pool of `ray.inference_actors` actors)
                 -> batches back to the stage, in order -> shards / confusion matrices

Both paths run `predict_batch` on the same record batches and hand the stage the same
columns, so their results are identical (tested). The stages run the Ray Data pipeline; the
teacher's own val score and the benchmark's baseline use the plain loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline.config.params import ModelConfig, RayConfig
from pipeline.data.png import decode_png, encode_png, stack_decoded
from pipeline.data.shards import IGNORE_INDEX, DataError, parquet_files
from pipeline.infer.metrics import ValCounts, confusion_matrix
from pipeline.runtime.storage import worker_uris

if TYPE_CHECKING:  # the models (timm) are imported where a network is built: not by a stage's driver
    from ray import ObjectRef

    from pipeline.models.transunet import SegmentationNet

Batch = dict[str, np.ndarray]


def probabilities(model: SegmentationNet, images: torch.Tensor, flip_tta: bool) -> torch.Tensor:
    """Softmax over classes for uint8 images N×3×H×W, averaged with the mirrored view if asked."""
    # Here, not at the top: torchvision (under augment, and timm) costs a stage's driver 2 s; the
    # replicas that call this have already loaded both to build `model`.
    from pipeline.data import augment
    from pipeline.models.transunet import mixed_precision

    device = next(model.parameters()).device
    x = augment.to_model_range(augment.to_unit_float(images.to(device)))
    with torch.no_grad(), mixed_precision(device):
        probs = model(x).float().softmax(1)
        if flip_tta:
            probs = 0.5 * (probs + model(x.flip(-1)).float().softmax(1).flip(-1))
    return probs


def predict_batch(models: dict[str, SegmentationNet], batch: Batch, flip_tta: bool) -> Batch:
    """The batch (PNG columns as stored) plus, per model, `<name>_label` and
    `<name>_confidence` (uint8 N×H×W; confidence ×255)."""
    images = stack_decoded([stored_png(eid, v) for eid, v in zip(batch["id"], batch["image"])])
    out = dict(batch)
    if "mask" in out:
        # Missing masks as empty bytes, not None: Ray Data turns a column of only None into
        # float NaNs on its way back to the stage.
        out["mask"] = np.array([v if has_png(v) else b"" for v in out["mask"]], dtype=object)
    for name, model in models.items():
        confidence, label = probabilities(model, images, flip_tta).max(1)
        out[f"{name}_label"] = label.to(torch.uint8).cpu().numpy()
        out[f"{name}_confidence"] = (confidence * 255).round().to(torch.uint8).cpu().numpy()
    return out


def stored_png(example_id: str, value) -> np.ndarray:
    """A PNG of a prepared split, decoded; bytes that do not decode are our error, naming the image."""
    try:
        return decode_png(value)
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for broken bytes
        raise DataError(f"image {example_id!r}: its stored bytes are not a PNG ({type(err).__name__}); "
                        "rerun the stage that wrote the split") from None


class SegmenterReplica:
    """One actor of the Ray Data pool: the models built once, then `predict_batch` per batch."""

    def __init__(self, states: ObjectRef, model: ModelConfig, num_classes: int, flip_tta: bool,
                 threads: int, use_gpu: bool):
        """`states`: the models' state dicts by name, in Ray's object store."""
        import ray

        from pipeline.models.transunet import network_from_state

        states = ray.get(states)
        torch.set_num_threads(threads)
        device = torch.device("cuda" if use_gpu else "cpu")
        self.models = {name: network_from_state(model, num_classes, state).eval().to(device)
                       for name, state in states.items()}
        self.flip_tta = flip_tta

    def __call__(self, batch: Batch) -> Batch:
        return predict_batch(self.models, batch, self.flip_tta)


def _row_count(files: list[Path]) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def local_predictions(models: dict[str, SegmentationNet], split: Path, columns: list[str], batch_size: int,
                      flip_tta: bool, desc: str) -> Iterator[Batch]:
    """`predict_batch` over a split in this process (no Ray): the baseline."""
    files = parquet_files(split)
    with tqdm(total=_row_count(files), desc=desc, unit="img", mininterval=2) as bar:
        for file in files:
            for record_batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=columns):
                batch = {c: np.array(record_batch.column(c).to_pylist(), dtype=object) for c in columns}
                bar.update(len(batch["id"]))
                yield predict_batch(models, batch, flip_tta)


@contextmanager
def ray_predictions(states: dict[str, dict], model: ModelConfig, num_classes: int, split: Path, columns: list[str],
                    batch_size: int, flip_tta: bool, ray_cfg: RayConfig) -> Iterator[Iterator[Batch]]:
    """`predict_batch` over a split as a Ray Data pipeline with `ray.inference_actors` model
    replicas (one GPU each when `use_gpu`), batches returned in the split's order."""
    with ray_map(SegmenterReplica, {"states": states, "model": model, "num_classes": num_classes, "flip_tta": flip_tta,
                                    "threads": ray_cfg.cpus_per_worker, "use_gpu": ray_cfg.use_gpu},
                 split, columns, batch_size, ray_cfg, by_reference=("states",)) as batches:
        yield batches


@contextmanager
def ray_map(actor: type, actor_kwargs: dict, split: Path, columns: list[str], batch_size: int,
            ray_cfg: RayConfig, by_reference: tuple[str, ...] = ()) -> Iterator[Iterator[Batch]]:
    """A split's `columns` through a pool of `ray.inference_actors` `actor(**actor_kwargs)`
    (called on each batch) as a Ray Data pipeline, batches in the split's order. The kwargs named
    in `by_reference` reach the actors as one reference each into Ray's object store (the actor
    `ray.get`s them): Ray Data writes out its actors' arguments (`repr`, twice), which for a
    model's state dict is every tensor, ~0.5 s a model here.

    A context manager: leaving it, however it is left, stops the pipeline and its actors while
    Ray is still up. A pipeline left to Python's exit would be stopped after Ray's own exit
    hook, and Ray Data's clean-up then starts a new Ray and waits on it forever."""
    from pipeline.runtime.ray_logging import quiet_ray_data_console
    from pipeline.runtime.ray_session import init_ray

    init_ray(ray_cfg)
    import ray
    import ray.data

    actor_kwargs = {name: ray.put(value) if name in by_reference else value for name, value in actor_kwargs.items()}
    quiet_ray_data_console()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Ray Data's V2 Parquet reader lists files in a task and provisions footer-reader actors:
    # ~10 s per stage on a small node, for shards of a few MB. V1 reads them directly.
    context.use_datasource_v2 = False
    context.execution_options.preserve_order = True  # shards in the split's order, as the plain loop writes them
    context.raise_original_map_exception = True  # our DataError reaches the stage, not a UserCodeException
    dataset = ray.data.read_parquet(worker_uris(parquet_files(split), ray_cfg.data_uri), columns=columns)
    mapped = dataset.map_batches(
        actor, batch_size=batch_size, batch_format="numpy", fn_constructor_kwargs=actor_kwargs,
        compute=ray.data.ActorPoolStrategy(size=ray_cfg.inference_actors),
        num_cpus=1 if ray_cfg.use_gpu else ray_cfg.cpus_per_worker, num_gpus=1 if ray_cfg.use_gpu else 0)
    batches = iter(mapped.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        yield batches
    finally:
        batches.close()


def iter_split(path: Path, batch_size: int, columns: list[str], desc: str) -> Iterator[dict]:
    """Record batches of a prepared split, with PNG columns decoded to uint8 tensors (and the
    PNGs kept as `<column>_bytes`); a column with any missing value is None."""
    files = parquet_files(path)
    with tqdm(total=_row_count(files), desc=desc, unit="img", mininterval=2) as bar:
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=columns):
                out = {"id": batch.column("id").to_pylist()}
                for column in columns:
                    if column == "id":
                        continue
                    values = batch.column(column).to_pylist()
                    if any(v is None for v in values):
                        out[column] = None
                        continue
                    out[column] = stack_decoded([decode_png(v) for v in values])
                    out[f"{column}_bytes"] = values
                bar.update(len(out["id"]))
                yield out


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor of a column Ray Data may hand over read-only (copied only then)."""
    return torch.from_numpy(np.require(array, requirements=["C", "W"]))


def has_png(value) -> bool:
    """Whether a PNG column's value is there: a stored null arrives as None from Parquet and as
    empty bytes from a replica (`predict_batch`)."""
    return isinstance(value, bytes) and len(value) > 0


def held_masks(batch: Batch) -> tuple[list[int], torch.Tensor | None]:
    """The rows of the batch that have a mask, and those masks decoded (None when no row has one)."""
    rows = [i for i, v in enumerate(batch.get("mask", ())) if has_png(v)]
    return rows, stack_decoded([decode_png(batch["mask"][i]) for i in rows]) if rows else None


def pseudo_label_rows(batches: Iterator[Batch], name: str, confusion: torch.Tensor) -> Iterator[dict]:
    """Pseudo-label shard rows (image, hard label, confidence as PNGs) from `name`'s predictions.

    Where held-aside masks exist, adds pseudo-label vs. truth counts to `confusion` (to report
    pseudo-label quality; those masks are never used to train).
    """
    for batch in batches:
        labels, confidences = batch[f"{name}_label"], batch[f"{name}_confidence"]
        rows, masks = held_masks(batch)
        if rows:
            confusion += confusion_matrix(_tensor(labels[rows]), masks, confusion.shape[0])
        for i, eid in enumerate(batch["id"]):
            yield {"id": eid, "image": batch["image"][i], "pseudo_label": encode_png(labels[i]),
                   "confidence": encode_png(confidences[i])}


def counts_and_samples(batches: Iterator[Batch], names: list[str], num_classes: int, keep: int,
                       later_as_background: bool = False) -> tuple[dict[str, ValCounts], dict[str, torch.Tensor]]:
    """Per model, the val counts (confusion matrix, boundary pixels) over every val pixel; plus
    the first `keep` images, masks and predictions for the figures. With `later_as_background`
    (an incremental step scored on val with every class), a class from `num_classes` on, which
    the models were not yet taught, is background in the masks, as the field scores a step."""
    counts = {name: ValCounts.zeros(num_classes) for name in names}
    samples: dict[str, list] = {"image": [], "mask": [], **{name: [] for name in names}}
    taken = 0
    for batch in batches:
        if not len(batch["id"]):
            continue
        rows, masks = held_masks(batch)
        if len(rows) < len(batch["id"]):
            missing = [eid for i, eid in enumerate(batch["id"]) if i not in rows]
            raise DataError(f"image {missing[0]!r} has no mask; every image scored needs its ground truth")
        if later_as_background:
            masks = torch.where((masks >= num_classes) & (masks != IGNORE_INDEX), 0, masks)
        room = max(0, keep - taken)
        preds = {name: _tensor(batch[f"{name}_label"]).long() for name in names}
        for name, pred in preds.items():
            counts[name].add(pred, masks)
        if room:
            samples["image"].append(stack_decoded([decode_png(v) for v in batch["image"][:room]]))
            samples["mask"].append(masks[:room])
            for name, pred in preds.items():
                samples[name].append(pred[:room])
        taken += len(batch["id"])
    return counts, {k: torch.cat(v) if v else torch.empty(0) for k, v in samples.items()}


def evaluate_split(models: dict[str, SegmentationNet], val: Path, batch_size: int, num_classes: int,
                   keep: int, later_as_background: bool = False) -> tuple[dict[str, ValCounts], dict[str, torch.Tensor]]:
    """`counts_and_samples` of the val split, in this process."""
    batches = local_predictions(models, val, ["id", "image", "mask"], batch_size, False, "evaluate")
    return counts_and_samples(batches, list(models), num_classes, keep, later_as_background)
