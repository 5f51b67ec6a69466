"""What one optimisation step of each training stage computes, and the per-worker loops.

A `*_step` factory returns a closure that draws a batch, augments it and returns its losses
(the first one is optimised); a builder per stage (`BUILDERS`) puts network, optimizer and
step together. The same parts run inside Ray Train (`train_worker`, through
`raytrain.run_epochs`) and in a plain PyTorch loop (the benchmark's baseline).
"""

from __future__ import annotations

from collections.abc import Callable
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from pipeline import augment
from pipeline.config import DecoderPretrainConfig, FinetuneConfig, StudentConfig, TrainConfig
from pipeline.copy_paste import InstanceBank
from pipeline.data import IGNORE_INDEX, read_tensors
from pipeline.denoising import DENOISE_CHANNELS, corrupt
from pipeline.dsbn import add_auxiliary_bn, main_samples_first
from pipeline.losses import (
    denoising_loss,
    pixel_contrastive_loss,
    segmentation_ce,
    self_correction_loss,
    weighted_ce,
)
from pipeline.models import (
    ENCODER_PRESETS,
    EncoderClassifier,
    ProjectedSegmenter,
    SegmentationNet,
    build_network,
)
from pipeline.raytrain import (
    JobConfig,
    WorkerSetup,
    run_epochs,
    train_steps,
    unwrap,
    warmup_cosine,
)
from pipeline.stage import peak_rss_mb

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
    with labeled objects from `bank` pasted in first, and the dense contrastive loss when the
    model also returns pixel embeddings. Both batches go through one forward pass; with DSBN
    the pseudo-labeled half uses the auxiliary BNs."""
    images, masks = labeled
    p_images, p_labels, p_conf = pseudo
    confident_labels = torch.where(p_conf.float() / 255.0 >= cfg.conf_threshold, p_labels,
                                   torch.full_like(p_labels, IGNORE_INDEX))
    label_maps = torch.stack([confident_labels.long(), p_conf.long()], dim=1)  # moved together by every view

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
        with routing:
            out = model(model_input(torch.cat([x, px]), device))
        logits, embeddings = out if isinstance(out, tuple) else (out, None)
        labeled_ce = segmentation_ce(logits[: len(x)], y)
        pseudo_loss = pseudo_label_loss(logits[len(x):], maps[:, 0], maps[:, 1], cfg)
        losses = {"loss": labeled_ce + cfg.pseudo_weight * pseudo_loss,
                  "labeled_ce": labeled_ce, "pseudo_loss": pseudo_loss}
        if embeddings is not None:
            contrast = pixel_contrastive_loss(embeddings, torch.cat([y, maps[:, 0]]),
                                              cfg.dense_contrast_temperature, cfg.dense_contrast_points, generator)
            losses["loss"] = losses["loss"] + cfg.dense_contrast_weight * contrast
            losses["dense_contrast"] = contrast
        return losses
    return step


# ------------------------------------------------------- what each training stage trains
# A builder takes the job, this worker's data (in-memory tensors by dataset name) and the
# worker's setup, and returns the network, its optimizer and its step. Ray Train runs it through
# `train_worker`; the benchmark runs the very same parts in a plain PyTorch loop.

@dataclass
class Trainable:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Step


def _optimizer(params, train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel over all tensors where torch has that kernel (CPU, CUDA).
    The per-tensor loop it replaces costs 3-4 ms a step on the tiny preset's ~100 tensors here,
    about 5% of a teacher step; fused it is under 1 ms."""
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay,
                             fused=device.type in ("cpu", "cuda"))


def _finetune_optimizer(model: nn.Module, train: FinetuneConfig, device: torch.device) -> torch.optim.Optimizer:
    """All weights train; the pretrained encoder at `encoder_lr_scale` × lr."""
    net = unwrap(model)
    encoder = list(net.encoder.parameters())
    in_encoder = {id(p) for p in encoder}
    rest = [p for p in net.parameters() if id(p) not in in_encoder]
    groups = [{"params": encoder, "lr": train.lr * train.encoder_lr_scale}, {"params": rest}]
    return _optimizer(groups, train, device)


def encoder_classify(job: JobConfig, data: dict, setup: WorkerSetup) -> Trainable:
    model = setup.prepare(EncoderClassifier(ENCODER_PRESETS[job.model.preset], job.num_classes)
                          .to(memory_format=torch.channels_last))
    step = classification_step(model, data["classify"]["image"], data["classify"]["label"].long(),
                               setup.per_worker(job.train.batch_size), setup.generator, setup.device)
    return Trainable(model, _optimizer(model.parameters(), job.train, setup.device), step)


def encoder_densecl(job: JobConfig, data: dict, setup: WorkerSetup) -> Trainable:
    from pipeline.densecl import DenseCL

    model = setup.prepare(DenseCL(ENCODER_PRESETS[job.model.preset], job.train.densecl)
                          .to(memory_format=torch.channels_last))
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = densecl_step(model, data["images"]["image"], setup.per_worker(job.train.batch_size), setup.generator,
                        setup.device)
    return Trainable(model, _optimizer(trainable, job.train, setup.device), step)


def decoder_pretrain(job: JobConfig, data: dict, setup: WorkerSetup) -> Trainable:
    model = build_network(job.model, DENOISE_CHANNELS, job.train.sigma_conditioning)
    model.encoder.load_state_dict(job.init_state)
    if job.train.mode == "ddep":
        model.encoder.requires_grad_(False)  # the encoder stays exactly as pretrained
    model = setup.prepare(model.to(memory_format=torch.channels_last))
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = denoising_step(model, data["images"]["image"], setup.per_worker(job.train.batch_size), job.train,
                          setup.generator, setup.device)
    return Trainable(model, _optimizer(trainable, job.train, setup.device), step)


def _segmenter_from(job: JobConfig) -> SegmentationNet:
    """The previous stage's network with a K-class head: a denoising head is always replaced,
    even when its channels happen to equal the class count."""
    model = build_network(job.model, DENOISE_CHANNELS if job.init_from_denoiser else job.num_classes)
    model.load_state_dict(job.init_state)
    if job.init_from_denoiser:
        model.replace_head(job.num_classes)
    return model.to(memory_format=torch.channels_last)


def teacher(job: JobConfig, data: dict, setup: WorkerSetup) -> Trainable:
    model = setup.prepare(_segmenter_from(job))
    labeled = data["labeled"]
    step = supervised_step(model, labeled["image"], labeled["mask"], setup.per_worker(job.train.batch_size),
                           job.train.crop_scale_min, job.train.hflip, setup.generator, setup.device)
    return Trainable(model, _finetune_optimizer(model, job.train, setup.device), step)


def student(job: JobConfig, data: dict, setup: WorkerSetup) -> Trainable:
    cfg: StudentConfig = job.train
    labeled, pseudo = data["labeled"], data["pseudo"]
    model = _segmenter_from(job)
    if cfg.dense_contrast_weight > 0:
        model = ProjectedSegmenter(model, cfg.projection_dim).to(memory_format=torch.channels_last)
    model = setup.prepare(add_auxiliary_bn(model) if cfg.dsbn else model)
    bank = None
    if cfg.copy_paste_probability > 0:
        excluded = frozenset(i for i, name in enumerate(job.classes) if name in cfg.copy_paste_exclude)
        bank = InstanceBank(labeled["image"], labeled["mask"], job.num_classes, cfg.copy_paste_bank,
                            setup.generator, excluded)
    batches = (setup.per_worker(cfg.batch_size), setup.per_worker(cfg.unlabeled_batch_size))
    step = student_step(model, (labeled["image"], labeled["mask"]),
                        (pseudo["image"], pseudo["pseudo_label"], pseudo["confidence"]), cfg,
                        batches, setup.generator, setup.device, bank)
    return Trainable(model, _finetune_optimizer(model, job.train, setup.device), step)


BUILDERS: dict[str, Callable[[JobConfig, dict, WorkerSetup], Trainable]] = {
    "encoder_classify": encoder_classify, "encoder_densecl": encoder_densecl, "decoder_pretrain": decoder_pretrain,
    "teacher": teacher, "student": student,
}


def train_worker(builder: str, job: JobConfig, data: dict, started_at: float, data_seconds: float) -> None:
    """The Ray Train loop of every stage, entered at `started_at`: the stage's parts over this
    worker's shards (loaded in `data_seconds`), then the epochs."""
    setup = WorkerSetup.from_job(job)
    setup.started_at, setup.data_seconds = started_at, data_seconds
    parts = BUILDERS[builder](job, data, setup)
    run_epochs(parts.model, parts.optimizer, parts.step, job.train, setup)


def plain_train(builder: str, job: JobConfig, datasets: dict[str, tuple[list, list[str]]]) -> tuple[dict, dict]:
    """The benchmark's baseline: the same builder, data, threads and number of steps as the
    stage's Ray Train job, in this one process with no Ray at all. Returns what `launch` does."""
    started = time.perf_counter()
    data = {name: read_tensors(folders, columns) for name, (folders, columns) in datasets.items()}
    data_seconds = time.perf_counter() - started
    setup = WorkerSetup.plain(job)
    parts = BUILDERS[builder](job, data, setup)
    steps = job.train.epochs * job.train.steps_per_epoch
    started = time.perf_counter()
    totals = train_steps(parts.model, parts.optimizer, warmup_cosine(parts.optimizer, steps), parts.step, steps,
                         setup.device)
    metrics = {key: value / steps for key, value in totals.items()}
    metrics |= {"loop_seconds": time.perf_counter() - started, "data_seconds": data_seconds, "world_size": 1,
                "worker_peak_rss_mb": peak_rss_mb()}
    return {"model": parts.model.state_dict()}, metrics
