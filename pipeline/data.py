"""Prepared data: Parquet shards of PNG-encoded images and masks, splits and the manifest.

Segmentation splits (`labeled`, `unlabeled`, `val`) share one schema; on `unlabeled` the mask
column holds the held-aside ground truth (only used to score pseudo-labels, never to train)
or null when there is none. `classify` holds image-level labels for encoder pretraining.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import DataConfig

IGNORE_INDEX = 255
SEGMENTATION_SPLITS = ("labeled", "unlabeled", "val")
SEGMENTATION_SCHEMA = pa.schema([
    ("id", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
    ("image", pa.binary()), ("mask", pa.binary()),
])
CLASSIFY_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int32())])
PSEUDO_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("pseudo_label", pa.binary()), ("confidence", pa.binary()),
])
MANIFEST = "manifest.json"


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and what was expected."""


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def stack_decoded(arrays: list[np.ndarray]):
    """Decoded PNGs as one uint8 tensor: images N×3×H×W, masks N×H×W."""
    import torch

    tensor = torch.from_numpy(np.stack(arrays))
    return tensor.permute(0, 3, 1, 2).contiguous() if tensor.ndim == 4 else tensor


def nested_labeled_ids(train_ids: list[str], fraction: float, seed: int) -> list[str]:
    """The first round(fraction * n) ids of one seeded permutation, so the labeled subset at
    fraction f is contained in the subset at any larger f with the same seed."""
    order = np.random.default_rng(seed).permutation(len(train_ids))
    count = int(round(fraction * len(train_ids)))
    if count < 1:
        raise DataError(f"data.labeled_fraction={fraction} selects no image out of {len(train_ids)}")
    return sorted(train_ids[i] for i in order[:count])


class ShardWriter:
    """Writes rows as `part-NNNNN.parquet` files of at most `shard_rows` rows as they come, so a
    large dataset never has to fit in memory. Always writes at least one (maybe empty) part."""

    def __init__(self, out_dir: Path, schema: pa.Schema, shard_rows: int):
        self.out_dir, self.schema, self.shard_rows = out_dir, schema, shard_rows
        out_dir.mkdir(parents=True, exist_ok=True)
        self.batch: list[dict] = []
        self.count = self.parts = 0

    def add(self, row: dict) -> None:
        self.batch.append(row)
        if len(self.batch) == self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        pq.write_table(pa.Table.from_pylist(self.batch, self.schema), self.out_dir / f"part-{self.parts:05d}.parquet")
        self.count, self.parts, self.batch = self.count + len(self.batch), self.parts + 1, []

    def close(self) -> int:
        if self.batch or self.parts == 0:
            self._flush()
        return self.count


def write_shards(rows: Iterable[dict], schema: pa.Schema, out_dir: Path, shard_rows: int) -> int:
    """Write rows as `part-NNNNN.parquet` files of at most `shard_rows` rows; return the count."""
    writer = ShardWriter(out_dir, schema, shard_rows)
    for row in rows:
        writer.add(row)
    return writer.close()


def read_split(path: Path, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
    """Read one split directory in full, or the rows matching pyarrow `filters`."""
    return pq.read_table(path, columns=columns, filters=filters)


def publish(tmp: Path, final: Path) -> None:
    """Move a completed output into place, so a killed stage never leaves a half-written one."""
    remove_path(final)
    tmp.rename(final)


def write_text_atomic(path: Path, text: str) -> None:
    with staged(path) as tmp:
        tmp.write_text(text)


@contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A temp path for `final`, moved into place when the block completes and removed when it
    raises, so nothing half-written is ever left where `final` belongs. `final`'s folder is
    created if missing.

    Inside a DVC project the temp lives in the project's scratch folder `.dvc/tmp/staging/`,
    not next to the output: a stage killed outright (SIGKILL, power loss) cannot clean up, and
    when DVC then restores that stage from its run cache no stage code runs to do it either.
    Leftovers of dead writers there are removed by the next write."""
    tmp, holder = _temp_location(final)
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    else:
        publish(tmp, final)
    finally:
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)


STAGING = Path(".dvc/tmp/staging")


def _temp_location(final: Path) -> tuple[Path, Path | None]:
    """(temp path, the folder holding it that is removed afterwards): `<holder>/<name>` with
    holder `.dvc/tmp/staging/<host>-<pid>-<n>` of the DVC project holding `final` (same
    filesystem, so the final rename is atomic), else the hidden sibling `.<name>.tmp`."""
    staging = _staging_dir(final)
    if staging is None:
        tmp = final.with_name(f".{final.name}.tmp")
        remove_path(tmp)
        return tmp, None
    _sweep_dead_writers(staging)
    holder = Path(tempfile.mkdtemp(prefix=f"{socket.gethostname()}-{os.getpid()}-", dir=staging))
    return holder / final.name, holder


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _staging_dir(final: Path) -> Path | None:
    parent = final.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    for root in (parent, *parent.parents):
        if (root / ".dvc").is_dir():
            staging = root / STAGING
            staging.mkdir(parents=True, exist_ok=True)
            return staging if staging.stat().st_dev == parent.stat().st_dev else None
    return None


def _sweep_dead_writers(staging: Path) -> None:
    """Remove what writers on this host that no longer run left behind."""
    host = socket.gethostname()
    for holder in staging.iterdir():
        owner, _, pid = holder.name.rsplit("-", 1)[0].rpartition("-")  # <host>-<pid>-<n>
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(holder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


class SplitWriter:
    """Streams segmentation examples into the three splits' shards under `out_dir` and tallies
    the labeled split's class pixels."""

    def __init__(self, num_classes: int, out_dir: Path, shard_rows: int):
        self.num_classes = num_classes
        self.shards = {s: ShardWriter(out_dir / s, SEGMENTATION_SCHEMA, shard_rows) for s in SEGMENTATION_SPLITS}
        self.ids: dict[str, list[str]] = {s: [] for s in SEGMENTATION_SPLITS}
        self.seen: set[str] = set()
        self.pixel_counts = np.zeros(num_classes, dtype=np.int64)

    def add(self, split: str, example_id: str, image: np.ndarray, mask: np.ndarray | None) -> None:
        if mask is not None and split == "labeled":
            self.pixel_counts += np.bincount(mask[mask != IGNORE_INDEX].ravel(),
                                             minlength=self.num_classes)[: self.num_classes]
        if example_id in self.seen:
            raise DataError(f"id {example_id!r} occurs twice in the dataset (e.g. a.png and a.jpg, or an image "
                            "named like another's tile <id>_t<k>); ids must be unique")
        self.seen.add(example_id)
        self.ids[split].append(example_id)
        self.shards[split].add({
            "id": example_id, "height": image.shape[0], "width": image.shape[1],
            "image": encode_png(image), "mask": None if mask is None else encode_png(mask),
        })


def write_prepared(writer: SplitWriter, classify_rows: list[dict], classes: list[str],
                   cfg: DataConfig, tmp: Path) -> dict:
    """Close the splits `writer` streamed into `tmp`, add the classify split and the manifest."""
    counts = {split: shards.close() for split, shards in writer.shards.items()}
    for split, count in counts.items():
        if count == 0 and split != "unlabeled":
            raise DataError(f"split '{split}' is empty: check data.root and data.labeled_fraction")
    counts["classify"] = write_shards(classify_rows, CLASSIFY_SCHEMA, tmp / "classify", cfg.shard_rows)
    total = max(int(writer.pixel_counts.sum()), 1)
    manifest = {
        "format": cfg.format,
        "classes": list(classes),
        "num_classes": len(classes),
        "classify_num_classes": max((r["label"] for r in classify_rows), default=-1) + 1,
        "image_size": cfg.image_size,
        "labeled_fraction": cfg.labeled_fraction,
        "seed": cfg.seed,
        "counts": counts,
        "labeled_pixel_frequency": {c: round(int(n) / total, 6) for c, n in zip(classes, writer.pixel_counts)},
        "ids": writer.ids,
        "content_sha256": _content_hash(tmp),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _content_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.parquet")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def parquet_files(path: Path) -> list[Path]:
    """A split's shards in their order: the `*.parquet` files of a folder, or the one file."""
    return [path] if path.is_file() else sorted(path.glob("*.parquet"))


def check_rows(name: str, paths: list[Path], workers: int) -> int:
    """Count the rows of a dataset's Parquet folders; each of `workers` must get at least one."""
    rows = sum(pq.ParquetFile(f).metadata.num_rows for p in paths for f in parquet_files(Path(p)))
    if rows < workers:
        raise DataError(f"dataset '{name}' ({', '.join(map(str, paths))}) has {rows} rows, fewer than the "
                        f"{workers} Ray workers (ray.num_workers); add data or use fewer workers")
    return rows


def read_manifest(prepared_dir: Path) -> dict:
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: missing; run the prepare stage first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}); rerun the prepare stage") from None


def manifest_hash(prepared_dir: Path) -> str:
    return hashlib.sha256((Path(prepared_dir) / MANIFEST).read_bytes()).hexdigest()[:16]


def pretraining_images(prepared: Path, manifest: dict) -> list[Path]:
    """The Parquet folders whose images (not masks) self-supervised pretraining may use:
    the labeled split and, when there is one, the unlabeled split."""
    return [prepared / "labeled"] + ([prepared / "unlabeled"] if manifest["counts"]["unlabeled"] else [])


def columns_to_tensors(batches: Iterable[dict]) -> dict:
    """Stack column batches (dicts of numpy arrays) into tensors: PNG-bytes columns are decoded
    (images become uint8 N×3×H×W, masks N×H×W), numeric columns are concatenated."""
    import torch

    parts: dict[str, list] = {}
    for batch in batches:
        for key, values in batch.items():
            if values.dtype == object:
                parts.setdefault(key, []).extend(decode_png(v) for v in values)
            else:
                parts.setdefault(key, []).append(values)
    return {key: stack_decoded(values) if isinstance(values[0], np.ndarray) and values[0].ndim >= 2
            else torch.from_numpy(np.concatenate(values)) for key, values in parts.items()}


def read_tensors(folders: list[Path], columns: list[str]) -> dict:
    """A dataset's columns as in-memory tensors straight from its Parquet shards (no Ray): what a
    training worker holds after loading its Ray Data shard, for the benchmark's plain loop."""
    files = [f for folder in folders for f in parquet_files(Path(folder))]
    return columns_to_tensors({name: column.to_numpy(zero_copy_only=False) for name, column in
                               zip(columns, pq.read_table(f, columns=columns).columns)} for f in files)

