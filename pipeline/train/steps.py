"""What one optimisation step of each training stage computes.

A `*_step` factory returns a closure that draws a batch, augments it and returns its losses
(the first one is optimised)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from pipeline.config.params import DecoderPretrainConfig, StepTrainConfig, StudentConfig
from pipeline.data import augment
from pipeline.data.copy_paste import InstanceBank
from pipeline.data.shards import IGNORE_INDEX
from pipeline.losses import (
    contrast_points,
    denoising_loss,
    pixel_contrastive_loss,
    segmentation_ce,
    self_correction_loss,
    step_targets,
    weighted_ce,
)
from pipeline.models.denoising import corrupt
from pipeline.models.dsbn import main_samples_first
from pipeline.train.loop import unwrap

Step = Callable[[], dict]


def _draw(generator: torch.Generator, size: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`size` rows drawn with replacement, the same rows of each tensor."""
    idx = torch.randint(len(tensors[0]), (size,), generator=generator)
    return tuple(t[idx] for t in tensors)


def to_device(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A batch drawn from the host's tensors, moved before it is augmented so that a GPU does
    the augmenting. Host to device, non-blocking: CUDA stages the rows and returns without
    waiting for the steps still queued on the GPU."""
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def model_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images in [0, 1] -> the model's [-1, 1] range, channels-last (faster convolutions on CPU)."""
    return augment.to_model_range(x).to(device, memory_format=torch.channels_last)


def classification_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int,
                        generator: torch.Generator, device: torch.device) -> Step:
    """Supervised encoder pretraining: cross-entropy on image-level labels, zoom/crop views."""
    def step() -> dict:
        x, y = to_device(device, *_draw(generator, batch, images, labels))
        x, _ = augment.random_view(augment.to_unit_float(x), None, (0.8, 1.1), generator, hflip=False)
        return {"loss": nn.functional.cross_entropy(model(model_input(x, device)), y)}
    return step


def denoising_step(model: nn.Module, images: torch.Tensor, batch: int, cfg: DecoderPretrainConfig,
                   generator: torch.Generator, device: torch.device) -> Step:
    """DeP/DDeP: the network sees x̃ (see `denoising.corrupt`) and predicts ε (or x)."""
    def step() -> dict:
        x, = to_device(device, *_draw(generator, batch, images))
        noisy, sigma, target = corrupt(augment.to_model_range(augment.to_unit_float(x)), cfg, generator)
        predicted = model(noisy.to(device, memory_format=torch.channels_last),
                          sigma.to(device) if cfg.sigma_conditioning else None)
        return {"loss": denoising_loss(predicted, target)}
    return step


def two_views(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A DenseCL view: random crop (half to all of the area), flip, colour jitter."""
    x, _ = augment.random_view(augment.to_unit_float(images), None, (0.5 ** 0.5, 1.0), generator)
    return augment.color_jitter(x, 0.4, generator)


def densecl_step(model: nn.Module, images: torch.Tensor, batch: int, generator: torch.Generator,
                 device: torch.device) -> Step:
    """DenseCL: two views of each image, global + dense InfoNCE against the momentum branch."""
    def step() -> dict:
        chosen, = to_device(device, *_draw(generator, batch, images))
        return model(model_input(two_views(chosen, generator), device), model_input(two_views(chosen, generator), device))
    return step


def weak_view(images: torch.Tensor, masks: torch.Tensor, crop_scale_min: float, hflip: bool,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inception-style random resized crop (+ optional flip) of uint8 images and their masks."""
    side = (crop_scale_min ** 0.5, 1.0)
    return augment.random_view(augment.to_unit_float(images), masks, side, generator, hflip=hflip)


def supervised_step(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, batch: int,
                    crop_scale_min: float, hflip: bool, generator: torch.Generator,
                    device: torch.device) -> Step:
    """Teacher fine-tuning: cross-entropy on the labeled split under weak augmentation."""
    def step() -> dict:
        x, y = weak_view(*to_device(device, *_draw(generator, batch, images, masks)), crop_scale_min, hflip, generator)
        return {"loss": segmentation_ce(model(model_input(x, device)), y)}
    return step


def tag_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch: int, crop_scale_min: float,
             hflip: bool, generator: torch.Generator, device: torch.device) -> Step:
    """A step's tag classifier: BCE of its image logits against the tags (N×K multi-hot) under
    the weak augmentation (crops keep most of the image, so its tags still hold)."""
    def step() -> dict:
        x, y = to_device(device, *_draw(generator, batch, images, targets))
        x, _ = weak_view(x, None, crop_scale_min, hflip, generator)
        logits, _ = model(model_input(x, device))
        return {"loss": nn.functional.binary_cross_entropy_with_logits(logits, y)}
    return step


def strong_view(images: torch.Tensor, label_maps: torch.Tensor, cfg: StudentConfig,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RandAugment intensity ops on the image alone, then zoom 0.5-2x with crop or padding
    (and flip if enabled) applied identically to the image and its per-pixel maps. RandAugment
    runs on the host (its ops go image by image, one through Pillow); the zoom where the maps are."""
    x, = to_device(label_maps.device, augment.rand_augment(images, cfg.randaug_ops, generator))
    x = augment.to_unit_float(x)
    return augment.random_view(x, label_maps, (0.5, 2.0), generator, hflip=cfg.hflip)


def pseudo_label_loss(logits: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor,
                      cfg: StudentConfig) -> torch.Tensor:
    """The loss on pseudo-labeled pixels: self-correction or plain CE, each pixel optionally
    weighted by the teacher's confidence (uint8, 255 = 1)."""
    weight = confidence.float() / 255.0 if cfg.confidence_weighting else None
    if cfg.pseudo_loss == "ce":
        return weighted_ce(logits, labels, weight)
    return self_correction_loss(logits, labels, cfg.sc_alpha, cfg.sc_beta, cfg.sc_confident_above, weight)


def student_step(model: nn.Module, labeled: tuple[torch.Tensor, torch.Tensor],
                 pseudo: tuple[torch.Tensor, torch.Tensor, torch.Tensor], cfg: StudentConfig,
                 batches: tuple[int, int], generator: torch.Generator, device: torch.device,
                 bank: InstanceBank | None = None) -> Step:
    """Self-training: CE on a weakly augmented labeled batch plus the pseudo-label loss on a
    strongly augmented pseudo-labeled batch (pixels under the confidence threshold ignored),
    with labeled objects from `bank` pasted in first, and the dense contrastive loss when its
    weight is above 0 (the model then a `ProjectedSegmenter`, embedding only the sampled pixels).
    Both batches go through one forward pass; with DSBN the pseudo-labeled half uses the
    auxiliary BNs."""
    images, masks = labeled
    p_images, p_labels, p_conf = pseudo
    confident_labels = torch.where(p_conf.float() / 255.0 >= cfg.conf_threshold, p_labels,
                                   torch.full_like(p_labels, IGNORE_INDEX))
    label_maps = torch.stack([confident_labels.long(), p_conf.long()], dim=1)  # moved together by every view
    contrasted = cfg.dense_contrast_weight > 0  # the model is then a ProjectedSegmenter

    def step() -> dict:
        x, y = weak_view(*to_device(device, *_draw(generator, batches[0], images, masks)), cfg.crop_scale_min,
                         cfg.hflip, generator)
        px, maps = _draw(generator, batches[1], p_images, label_maps)
        if bank is not None:
            px, maps = bank.paste(px, maps, cfg.copy_paste_count, cfg.copy_paste_probability, generator, (255,))
        if cfg.strong_augment:
            px, maps = strong_view(px, *to_device(device, maps), cfg, generator)
        else:
            px, maps = weak_view(*to_device(device, px, maps), cfg.crop_scale_min, cfg.hflip, generator)
        routing = main_samples_first(unwrap(model), len(x)) if cfg.dsbn else nullcontext()
        inputs = model_input(torch.cat([x, px]), device)
        if contrasted:
            contrast_labels = torch.cat([y, maps[:, 0]]).reshape(-1)
            pixels = contrast_points(contrast_labels, cfg.dense_contrast_points, generator)
        with routing:
            logits, embeddings = model(inputs, pixels) if contrasted else (model(inputs), None)
        labeled_ce = segmentation_ce(logits[: len(x)], y)
        pseudo_loss = pseudo_label_loss(logits[len(x):], maps[:, 0], maps[:, 1], cfg)
        losses = {"loss": labeled_ce + cfg.pseudo_weight * pseudo_loss,
                  "labeled_ce": labeled_ce, "pseudo_loss": pseudo_loss}
        if contrasted:
            contrast = pixel_contrastive_loss(embeddings, contrast_labels[pixels],
                                              cfg.dense_contrast_temperature)
            losses["loss"] = losses["loss"] + cfg.dense_contrast_weight * contrast
            losses["dense_contrast"] = contrast
        return losses
    return step


def incremental_step(model: nn.Module, previous: nn.Module, images: torch.Tensor, masks: torch.Tensor,
                     cfg: StepTrainConfig, batch: int, generator: torch.Generator, device: torch.device,
                     steps_done: Callable[[], int], bank: InstanceBank | None = None) -> Step:
    """An incremental step (FMWISS): images of the step with their pseudo masks (uint8 N×K×H×W,
    one per new class), old-class objects from `bank` pasted in, under the weak augmentation.
    The model learns with BCE per class (`losses.step_targets`): the old classes from `previous`
    (frozen, the model before the step) on the same view, the new ones from the plug-in
    teacher's sigmoid once `cfg.warmup_steps` optimizer steps are done (`steps_done`; before,
    and without one: the masks); the plug-in teacher learns from the masks with BCE plus the
    dense contrastive loss."""
    contrasted = cfg.plugin_teacher and cfg.dense_contrast_weight > 0  # the plug-in teacher's embeddings

    def step() -> dict:
        x, m = _draw(generator, batch, images, masks)
        # Channel 0 gets a pasted object's class (0 elsewhere); the masks are 0 under it.
        maps = torch.cat([torch.zeros_like(m[:, :1]), m], dim=1)
        if bank is not None:
            x, maps = bank.paste(x, maps, cfg.copy_paste_count, cfg.copy_paste_probability, generator,
                                 (0,) * m.shape[1])
        x, maps = weak_view(*to_device(device, x, maps.long()), cfg.crop_scale_min, cfg.hflip, generator)
        x = model_input(x, device)
        pasted, new_masks = maps[:, 0], maps[:, 1:].float()
        pixels = labels = None
        if contrasted:
            # Each pixel's class for the contrast: its first new class, else 0; pasted ones left out.
            labels = torch.where(new_masks.amax(1) > 0, new_masks.argmax(1) + 1, 0)
            labels = torch.where(pasted > 0, IGNORE_INDEX, labels).reshape(-1)
            pixels = contrast_points(labels, cfg.dense_contrast_points, generator)
        with torch.no_grad():
            old_scores = torch.sigmoid(previous(x).float())
        logits, plugin_logits, embeddings = model(x, pixels)
        taught = plugin_logits is not None and steps_done() >= cfg.warmup_steps
        new_targets = torch.sigmoid(plugin_logits.detach().float()) if taught else new_masks
        targets = step_targets(old_scores if cfg.distill else None, new_targets, pasted, logits.shape[1])
        segmentation = nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
        losses = {"loss": segmentation, "segmentation": segmentation}
        if plugin_logits is not None:
            plugin = nn.functional.binary_cross_entropy_with_logits(plugin_logits.float(), new_masks)
            losses["plugin"] = plugin
            losses["loss"] = losses["loss"] + plugin
        if contrasted:
            contrast = pixel_contrastive_loss(embeddings, labels[pixels], cfg.dense_contrast_temperature)
            losses["dense_contrast"] = contrast
            losses["loss"] = losses["loss"] + cfg.dense_contrast_weight * contrast
        return losses
    return step
