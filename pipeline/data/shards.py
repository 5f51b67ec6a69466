"""Prepared data's tables: Parquet shards of PNG-encoded images and masks, their schemas,
writers and readers.

Segmentation splits (`labeled`, `unlabeled`, `val`) share one schema; on `unlabeled` the mask
column holds the held-aside ground truth (only used to score pseudo-labels, never to train)
or null when there is none. An incremental step's images add their tags (`TAGGED_SCHEMA`).
`CLASSIFY_SCHEMA` holds image-level labels: the stand-in encoder's
letters (`glyphs.write_letters`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

IGNORE_INDEX = 255
SEGMENTATION_SCHEMA = pa.schema([
    ("id", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
    ("image", pa.binary()), ("mask", pa.binary()),
])


# An incremental step's images (`prepare` with `incremental.steps`): their tags, the ids of the
# step's classes they show, are all the step trains on; the mask is held aside as on `unlabeled`.
TAGGED_SCHEMA = SEGMENTATION_SCHEMA.append(pa.field("tags", pa.list_(pa.int32())))
# An incremental step's pseudo masks (`pseudo_masks@<step>`): per image, one PNG per step class
# (1 where the fused mask has it) and its initial mask's classes (the setting's ids, 0 = background).
STEP_MASKS_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("tags", pa.list_(pa.int32())), ("masks", pa.list_(pa.binary())),
    ("initial", pa.binary()),
])
CLASSIFY_SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int32())])
PSEUDO_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("pseudo_label", pa.binary()), ("confidence", pa.binary()),
])


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and what was expected."""


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


def read_rank_columns(uris: list[str], columns: list[str], rank: int = 0, world_size: int = 1) -> dict:
    """Rank `rank`'s contiguous share of the rows of Parquet files `uris` (local paths, or URIs
    pyarrow's filesystems know, e.g. `s3://`), read straight with pyarrow and decoded into
    in-memory tensors (`tensors.columns_to_tensors`). Shares differ by at most one row and
    together hold every row once, in file order."""
    import pyarrow.fs as pafs

    from pipeline.data.tensors import columns_to_tensors

    files = []
    for uri in uris:
        filesystem, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (None, uri)
        files.append(pq.ParquetFile(path, filesystem=filesystem))
    sizes = [f.metadata.num_rows for f in files]
    total = sum(sizes)
    start, end = rank * total // world_size, (rank + 1) * total // world_size
    batches, offset = [], 0
    for file, size in zip(files, sizes):
        lo, hi = max(start - offset, 0), min(end - offset, size)
        if lo < hi:
            table = file.read(columns=columns).slice(lo, hi - lo)
            batches.append({name: table.column(name).to_numpy(zero_copy_only=False) for name in columns})
        offset += size
    return columns_to_tensors(batches)


def read_split(path: Path, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
    """Read one split directory in full, or the rows matching pyarrow `filters`."""
    return pq.read_table(path, columns=columns, filters=filters)


def parquet_files(path: Path) -> list[Path]:
    """A split's shards in their order: the `*.parquet` files of a folder, or the one file."""
    return [path] if path.is_file() else sorted(path.glob("*.parquet"))


def dataset_files(paths: Iterable[Path | str]) -> list[Path]:
    """A training dataset's shards (a recipe's dataset may span several folders), folder by folder."""
    return [f for p in paths for f in parquet_files(Path(p))]


def check_rows(name: str, paths: list[Path], workers: int) -> int:
    """Count the rows of a dataset's Parquet folders; each of `workers` must get at least one."""
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in dataset_files(paths))
    if rows < workers:
        raise DataError(f"dataset '{name}' ({', '.join(map(str, paths))}) has {rows} rows, fewer than the "
                        f"{workers} Ray workers (ray.num_workers); add data or use fewer workers")
    return rows
