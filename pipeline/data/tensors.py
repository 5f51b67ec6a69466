"""Shard columns as in-memory tensors."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.data.png import decode_png, stack_decoded


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
