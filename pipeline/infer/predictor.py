"""A trained segmenter with the preprocessing it was trained with, for images of any size:
what `pipeline.predict` runs and what the registered MLflow model serves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.data.formats import palette_for, square_layout, squares


@dataclass
class Prediction:
    labels: np.ndarray  # H×W uint8 class ids
    confidence: np.ndarray  # H×W float32, the top class's probability


class Predictor:
    """A segmentation network with the preprocessing it was trained with."""

    def __init__(self, net, classes: list[str], image_size: int, device: str = "cpu", batch_size: int = 16,
                 data_format: str = ""):
        from pipeline.models.checkpoints import CheckpointError

        stride = net.encoder.spec.token_stride
        if image_size % stride:
            raise CheckpointError(f"image size {image_size}: this model's encoder has its tokens at stride {stride}; "
                                  f"expected a multiple of {stride}")
        self.net = net.to(device).eval()
        self.classes, self.image_size, self.device, self.batch_size = classes, image_size, device, batch_size
        self.palette = palette_for({"format": data_format, "num_classes": len(classes)})

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """H×W×3 uint8 images of any sizes → one Prediction each, at the image's own size."""
        import torch

        from pipeline.infer.batch import probabilities

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
