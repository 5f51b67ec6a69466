"""Shard columns as in-memory tensors."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.data.png import decode_png, stack_decoded
from pipeline.data.shards import parquet_files


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
