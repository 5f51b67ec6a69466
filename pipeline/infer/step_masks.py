"""An incremental step's pseudo masks, batch by batch (`pseudo_masks@<step>` runs them as a Ray
Data pipeline): class maps give each tagged class its initial mask, seeds drawn inside it grow it
over the object, and the union of the two is the class's mask. The maps are the tag classifier's
activation maps or CLIP's scores, the growing the denoising-pretrained network's feature
affinity or DINO's attention (`pipeline.models.tag_masks`, `pipeline.models.foundation`)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.config.params import ModelConfig, StepMasksConfig
from pipeline.data.incremental import tag_targets
from pipeline.data.png import encode_png, stack_decoded
from pipeline.infer.batch import Batch, stored_png

if TYPE_CHECKING:
    from ray import ObjectRef


class StepMaskReplica:
    """One actor of the Ray Data pool: the step's mask sources built once, then `step_masks` per batch."""

    def __init__(self, states: ObjectRef, model: ModelConfig, classes: list[str], first_class: int,
                 cfg: StepMasksConfig, threads: int, use_gpu: bool):
        """`states`: `mask_sources`' models and weights, in Ray's object store; `classes`: the
        step's new classes."""
        import ray

        torch.set_num_threads(threads)
        self.sources = mask_sources(ray.get(states), model, classes, cfg, torch.device("cuda" if use_gpu else "cpu"))
        self.first_class, self.num_classes, self.cfg = first_class, len(classes), cfg

    def __call__(self, batch: Batch) -> Batch:
        return step_masks(self.sources, batch, self.first_class, self.num_classes, self.cfg)


@dataclass
class MaskSources:
    """FMWISS's two sources behind one interface. `class_maps(x, tagged, size)`: the tagged
    classes' maps scaled to [0, 1] (N×K×H×W), from which the initial masks are cut;
    `agnostic(x)`: what the seeds guidance reads per image (dense features, or attention);
    `grow(agnostic[n:n+1], initial, num_classes, seeds, threshold, generator)`: the guidance;
    `threshold`: its level (`affinity`, or `attention` for DINO's)."""

    class_maps: Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]
    agnostic: Callable[[torch.Tensor], torch.Tensor]
    grow: Callable[..., torch.Tensor]
    threshold: float
    device: torch.device


def foundation_models(cfg: StepMasksConfig, text: torch.Tensor | None) -> dict[str, torch.nn.Module]:
    """The foundation models `cfg` names, loaded once (in the stage's driver, before any Ray work,
    so one that cannot be loaded is one `error:` line, and handed to the actors by reference):
    {"clip": CLIP's image tower scoring `text` (the class names' embeddings, `clip_text`),
    "dino": DINO's attention}, each where named."""
    from pipeline.models.foundation import ClipScores, load_clip, load_dino

    models = {}
    if cfg.clip:
        models["clip"] = ClipScores(load_clip(cfg.clip)[0], text)
    if cfg.dino:
        models["dino"] = load_dino(cfg.dino, cfg.dino_weights_path)
    return models


def mask_sources(states: dict, model: ModelConfig, classes: list[str], cfg: StepMasksConfig,
                 device: torch.device) -> MaskSources:
    """CLIP's scores where `states` holds CLIP (`foundation_models`), else the activation maps of
    the tag classifier whose weights `states["classifier"]` are; DINO's attention where it holds
    DINO, else the features of the denoising-pretrained network `states["features"]`."""
    from pipeline.models.foundation import attention_guidance
    from pipeline.models.tag_masks import TagClassifier, activation_maps, seeds_guidance
    from pipeline.models.transunet import (
        ENCODER_PRESETS,
        HybridEncoder,
        module_from_state,
        network_from_state,
    )

    if "clip" in states:
        class_maps = states["clip"].to(device).class_maps
    else:
        spec = ENCODER_PRESETS[model.preset]
        classifier = module_from_state(lambda: TagClassifier(HybridEncoder(spec, initialise=False), len(classes)),
                                       states["classifier"]).eval().to(device)

        def class_maps(x: torch.Tensor, tagged: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
            return activation_maps(classifier(x)[1], tagged, size)
    if "dino" in states:
        return MaskSources(class_maps, states["dino"].to(device), attention_guidance, cfg.attention, device)
    from pipeline.models.denoising import DENOISE_CHANNELS

    # A noise-level embedding (sigma_conditioning) only shifts the decoder by the noise level;
    # the features are taken from clean images, with none.
    plain = {k: v for k, v in states["features"].items() if not k.startswith("noise_level.")}
    features = network_from_state(model, DENOISE_CHANNELS, plain).eval().to(device)
    return MaskSources(class_maps, lambda x: features.decoder(features.encoder(x)), seeds_guidance, cfg.affinity,
                       device)


def step_masks(sources: MaskSources, batch: Batch, first_class: int, num_classes: int, cfg: StepMasksConfig) -> Batch:
    """The batch plus, per image, `masks` (one PNG per step class, 1 where the class is: the
    fused mask) and `initial` (a PNG of the initial mask's classes, in the setting's ids, 0 =
    background). An image's seeds are drawn from a generator seeded by `cfg.seed` and its id,
    so its masks do not depend on the batch it comes in."""
    from pipeline.data import augment
    from pipeline.models.tag_masks import fuse, initial_masks

    images = stack_decoded([stored_png(eid, v) for eid, v in zip(batch["id"], batch["image"])])
    tags = torch.nn.utils.rnn.pad_sequence([torch.tensor(t, dtype=torch.int64) for t in batch["tags"]],
                                           batch_first=True, padding_value=-1)
    tagged = tag_targets(tags, first_class, num_classes).bool()
    x = augment.to_model_range(augment.to_unit_float(images.to(sources.device)))
    with torch.no_grad():
        cams = sources.class_maps(x, tagged.to(sources.device), tuple(x.shape[-2:])).cpu()
        agnostic = sources.agnostic(x).cpu() if cfg.seeds else None
    initial = initial_masks(cams, cfg.background)
    fused = []
    for n, eid in enumerate(batch["id"]):
        if cfg.seeds:
            generator = torch.Generator().manual_seed(cfg.seed * 2**32 + zlib.crc32(str(eid).encode()))
            guided = sources.grow(agnostic[n:n + 1], initial[n:n + 1], num_classes, cfg.seeds, sources.threshold,
                                  generator)
        else:  # the initial mask alone
            guided = torch.zeros(1, num_classes, *initial.shape[-2:], dtype=torch.bool)
        fused.append(fuse(initial[n:n + 1], guided)[0])
    out = dict(batch)
    out["masks"] = np.array([[encode_png(m.to(torch.uint8).numpy()) for m in image_masks] for image_masks in fused],
                            dtype=object)
    out["initial"] = np.array([encode_png(torch.where(m > 0, m + first_class - 1, 0).to(torch.uint8).numpy())
                               for m in initial], dtype=object)
    return out


def mask_rows(batches, first_class: int, num_classes: int, overlap: np.ndarray):
    """Shard rows (`STEP_MASKS_SCHEMA`) of `step_masks` batches. Where an image has its mask held
    aside, adds to `overlap` (2 × K × 2: the initial and the fused masks; per step class, the
    pixels where mask and truth both have it, and where either does), never used to train."""
    from pipeline.data.png import decode_png
    from pipeline.infer.batch import has_png

    for batch in batches:
        for n, eid in enumerate(batch["id"]):
            masks, initial = list(batch["masks"][n]), batch["initial"][n]
            held = batch["mask"][n] if "mask" in batch else None
            if has_png(held):
                truth = decode_png(held)
                first_guess = decode_png(initial)
                for k in range(num_classes):
                    true = truth == first_class + k
                    for kind, predicted in enumerate((first_guess == first_class + k, decode_png(masks[k]) > 0)):
                        overlap[kind, k] += ((predicted & true).sum(), (predicted | true).sum())
            yield {"id": eid, "image": batch["image"][n], "tags": [int(t) for t in batch["tags"][n]],
                   "masks": masks, "initial": initial}


def mask_scores(overlap: np.ndarray, classes: list[str]) -> dict:
    """Per step class and on average, the IoU of the initial and of the fused masks with the
    held-aside truth (a class in no mask and no truth counts for none)."""
    scores = {}
    for kind, name in enumerate(("initial", "fused")):
        ious = {c: float(i / u) for c, (i, u) in zip(classes, overlap[kind]) if u > 0}
        scores[name] = {"miou": float(np.mean(list(ious.values()))) if ious else float("nan"), "per_class_iou": ious}
    return scores
