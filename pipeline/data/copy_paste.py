"""Memory-based copy-paste (FMWISS): a bank of labeled object instances per class, pasted
into pseudo-labeled images with their masks, so that rare classes stay in view of the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage


@dataclass
class Instance:
    image: torch.Tensor  # uint8 3×h×w, the object's bounding box
    mask: torch.Tensor  # bool h×w, the object's pixels inside it
    label: int


class InstanceBank:
    """Up to `per_class` instances (connected components of one class in a labeled mask) of
    every class not in `exclude`, drawn at random from the labeled split."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, num_classes: int, per_class: int,
                 generator: torch.Generator, exclude: frozenset[int] = frozenset(), min_pixels: int = 16):
        found: dict[int, list[Instance]] = {}
        for image, mask in zip(images, masks.numpy()):
            for label in np.unique(mask):
                if label >= num_classes or label in exclude:
                    continue
                components, _ = ndimage.label(mask == label)
                for box_index, box in enumerate(ndimage.find_objects(components), start=1):
                    pixels = torch.from_numpy(components[box] == box_index)
                    if int(pixels.sum()) >= min_pixels:
                        found.setdefault(int(label), []).append(Instance(image[:, box[0], box[1]].clone(), pixels, int(label)))
        self.by_class = {label: [items[i] for i in torch.randperm(len(items), generator=generator)[:per_class].tolist()]
                         for label, items in sorted(found.items())}

    def __len__(self) -> int:
        return sum(len(items) for items in self.by_class.values())

    def sample(self, generator: torch.Generator) -> Instance:
        """A class uniformly among those in the bank (so rare ones come up as often as common
        ones), then one of its instances."""
        classes = list(self.by_class)
        items = self.by_class[classes[int(torch.randint(len(classes), (1,), generator=generator))]]
        return items[int(torch.randint(len(items), (1,), generator=generator))]

    def paste(self, images: torch.Tensor, label_maps: torch.Tensor, count: int, probability: float,
              generator: torch.Generator, pasted_value: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Paste `count` random instances at random places into each image chosen with
        `probability`; their pixels take the instance's class in the first label map and
        `pasted_value` in the others (e.g. full confidence). Images uint8 N×3×H×W, label maps
        N×C×H×W. Returns new tensors."""
        images, label_maps = images.clone(), label_maps.clone()
        if not self.by_class:
            return images, label_maps
        height, width = images.shape[2:]
        for i in range(len(images)):
            if torch.rand(1, generator=generator).item() >= probability:
                continue
            for _ in range(count):
                item = self.sample(generator)
                h, w = min(item.mask.shape[0], height), min(item.mask.shape[1], width)
                top = int(torch.randint(height - h + 1, (1,), generator=generator))
                left = int(torch.randint(width - w + 1, (1,), generator=generator))
                where = item.mask[:h, :w]
                images[i, :, top:top + h, left:left + w][:, where] = item.image[:, :h, :w][:, where]
                maps = label_maps[i, :, top:top + h, left:left + w]
                maps[0][where] = item.label
                for channel, value in enumerate(pasted_value, start=1):
                    maps[channel][where] = value
        return images, label_maps
