"""The PNG codec of images and masks in the shards."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


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
