"""Shard columns as in-memory tensors."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.data.png import decode_png, stack_decoded


def columns_to_tensors(batches: Iterable[dict]) -> dict:
    """Stack column batches (dicts of numpy arrays) into tensors: PNG-bytes columns are decoded
    (images become uint8 N×3×H×W, masks N×H×W, lists of PNGs N×K×H×W), list columns of numbers (an
    incremental step's tags) padded with -1 into N×L int64, numeric columns concatenated."""
    import torch

    parts: dict[str, list] = {}
    for batch in batches:
        for key, values in batch.items():
            if values.dtype != object:
                parts.setdefault(key, []).append(values)
            elif len(values) and isinstance(values[0], np.ndarray) and values[0].dtype == object:
                # a list of PNGs (a step's masks, one per class): K×H×W a row
                parts.setdefault(key, []).extend(torch.from_numpy(np.stack([decode_png(b) for b in v]))
                                                 for v in values)
            elif len(values) and isinstance(values[0], np.ndarray):  # a list column: pyarrow hands arrays
                parts.setdefault(key, []).extend(torch.tensor(v, dtype=torch.int64) for v in values)
            else:
                parts.setdefault(key, []).extend(decode_png(v) for v in values)
    return {key: _stacked(values) for key, values in parts.items()}


def _stacked(values: list):
    import torch

    if isinstance(values[0], torch.Tensor) and values[0].dtype == torch.uint8:
        return torch.stack(values)
    if isinstance(values[0], torch.Tensor):
        return torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=-1)
    if isinstance(values[0], np.ndarray) and values[0].ndim >= 2:
        return stack_decoded(values)
    return torch.from_numpy(np.concatenate(values))
