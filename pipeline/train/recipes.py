"""What each training stage trains: a recipe names the Parquet folders it trains on, typed, and
builds the network, optimizer and step (`steps.py`) on each worker.

A stage script makes its recipe (`Teacher(labeled=(folder,))`) and hands it to its Ray Train
job; each field made with `shards(Rows)` is read as the columns of `Rows` and handed to `build`
as a `Rows` of in-memory tensors under the field's name. Recipes are made in the stage's own
process, which must not import timm or torchvision (seconds per stage): the models and the
steps are imported in `build`, on the workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from pipeline.config.params import FinetuneConfig, StepTrainConfig, StudentConfig, TrainConfig
from pipeline.data.incremental import tag_targets
from pipeline.models.denoising import DENOISE_CHANNELS
from pipeline.train.loop import JobConfig, WorkerSetup, unwrap

if TYPE_CHECKING:
    from torch import nn

    from pipeline.models.transunet import SegmentationNet
    from pipeline.train.steps import Step


class Images(NamedTuple):
    image: torch.Tensor  # uint8 N×3×H×W


class Classified(NamedTuple):
    image: torch.Tensor
    label: torch.Tensor  # int N


class Labeled(NamedTuple):
    image: torch.Tensor
    mask: torch.Tensor  # uint8 N×H×W, IGNORE_INDEX where unlabeled


class Tagged(NamedTuple):
    image: torch.Tensor
    tags: torch.Tensor  # int64 N×L: the class ids each image is tagged with, -1 after the last


class StepMasked(NamedTuple):
    image: torch.Tensor
    masks: torch.Tensor  # uint8 N×K×H×W: an incremental step's pseudo mask of each new class, 1 where it is


class PseudoLabeled(NamedTuple):
    image: torch.Tensor
    pseudo_label: torch.Tensor  # uint8 N×H×W
    confidence: torch.Tensor  # uint8 N×H×W, 255 = 1


def shards(rows: type[NamedTuple]) -> Any:
    """A recipe field: Parquet folders, read as the columns of `rows`."""
    return field(metadata={"rows": rows})


def rows_of(rows: type[NamedTuple], columns: dict[str, torch.Tensor]) -> NamedTuple:
    return rows(**{name: columns[name] for name in rows._fields})


@dataclass
class Trainable:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Step


@dataclass(frozen=True)
class Recipe:
    def datasets(self) -> dict[str, tuple[tuple[Path, ...], type[NamedTuple]]]:
        """Each dataset the job reads: its name, Parquet folders and rows type."""
        return {f.name: (tuple(getattr(self, f.name)), f.metadata["rows"]) for f in fields(self) if "rows" in f.metadata}

    def build(self, job: JobConfig, setup: WorkerSetup, **rows: NamedTuple) -> Trainable:
        raise NotImplementedError


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


@dataclass(frozen=True)
class EncoderClassify(Recipe):
    """Supervised encoder pretraining on shards of image-level labels (the stand-in's letters)."""

    classify: tuple[Path, ...] = shards(Classified)

    def build(self, job: JobConfig, setup: WorkerSetup, classify: Classified) -> Trainable:
        from pipeline.models.transunet import ENCODER_PRESETS, EncoderClassifier
        from pipeline.train.steps import classification_step

        model = setup.prepare(EncoderClassifier(ENCODER_PRESETS[job.model.preset], job.num_classes)
                              .to(memory_format=torch.channels_last))
        step = classification_step(model, classify.image, classify.label.long(),
                                   setup.per_worker(job.train.batch_size), setup.generator, setup.device)
        return Trainable(model, _optimizer(model.parameters(), job.train, setup.device), step)


@dataclass(frozen=True)
class EncoderDenseCL(Recipe):
    """DenseCL self-supervised encoder pretraining on images."""

    images: tuple[Path, ...] = shards(Images)

    def build(self, job: JobConfig, setup: WorkerSetup, images: Images) -> Trainable:
        from pipeline.models.densecl import DenseCL
        from pipeline.models.transunet import ENCODER_PRESETS
        from pipeline.train.steps import densecl_step

        model = setup.prepare(DenseCL(ENCODER_PRESETS[job.model.preset], job.train.densecl)
                              .to(memory_format=torch.channels_last))
        trainable = [p for p in model.parameters() if p.requires_grad]
        step = densecl_step(model, images.image, setup.per_worker(job.train.batch_size), setup.generator,
                            setup.device)
        return Trainable(model, _optimizer(trainable, job.train, setup.device), step)


@dataclass(frozen=True)
class DecoderPretrain(Recipe):
    """Denoising pretraining (DDeP: the decoder over the frozen encoder; DeP: the whole network)."""

    images: tuple[Path, ...] = shards(Images)

    def build(self, job: JobConfig, setup: WorkerSetup, images: Images) -> Trainable:
        from pipeline.models.transunet import build_network
        from pipeline.train.steps import denoising_step

        model = build_network(job.model, DENOISE_CHANNELS, job.train.sigma_conditioning)
        model.encoder.load_state_dict(job.init_state)
        if job.train.mode == "ddep":
            model.encoder.requires_grad_(False)  # the encoder stays exactly as pretrained
        model = setup.prepare(model.to(memory_format=torch.channels_last))
        trainable = [p for p in model.parameters() if p.requires_grad]
        step = denoising_step(model, images.image, setup.per_worker(job.train.batch_size), job.train,
                              setup.generator, setup.device)
        return Trainable(model, _optimizer(trainable, job.train, setup.device), step)


def _segmenter_from(job: JobConfig) -> SegmentationNet:
    """The previous stage's network with a K-class head: a denoising head is always replaced,
    even when its channels happen to equal the class count."""
    from pipeline.models.transunet import build_network

    model = build_network(job.model, DENOISE_CHANNELS if job.init_from_denoiser else job.num_classes)
    model.load_state_dict(job.init_state)
    if job.init_from_denoiser:
        model.replace_head(job.num_classes)
    return model.to(memory_format=torch.channels_last)


@dataclass(frozen=True)
class Teacher(Recipe):
    """Teacher fine-tuning: cross-entropy on the labeled split under weak augmentation."""

    labeled: tuple[Path, ...] = shards(Labeled)

    def build(self, job: JobConfig, setup: WorkerSetup, labeled: Labeled) -> Trainable:
        from pipeline.train.steps import supervised_step

        model = setup.prepare(_segmenter_from(job))
        step = supervised_step(model, labeled.image, labeled.mask, setup.per_worker(job.train.batch_size),
                               job.train.crop_scale_min, job.train.hflip, setup.generator, setup.device)
        return Trainable(model, _finetune_optimizer(model, job.train, setup.device), step)


@dataclass(frozen=True)
class Student(Recipe):
    """Self-training on the labeled split and the pseudo-labeled images."""

    labeled: tuple[Path, ...] = shards(Labeled)
    pseudo: tuple[Path, ...] = shards(PseudoLabeled)

    def build(self, job: JobConfig, setup: WorkerSetup, labeled: Labeled, pseudo: PseudoLabeled) -> Trainable:
        from pipeline.models.dsbn import add_auxiliary_bn
        from pipeline.models.transunet import ProjectedSegmenter
        from pipeline.train.steps import student_step

        cfg: StudentConfig = job.train
        model = _segmenter_from(job)
        if cfg.dense_contrast_weight > 0:
            model = ProjectedSegmenter(model, cfg.projection_dim).to(memory_format=torch.channels_last)
        model = setup.prepare(add_auxiliary_bn(model) if cfg.dsbn else model)
        bank = None
        if cfg.copy_paste_probability > 0:
            from pipeline.data.copy_paste import InstanceBank

            excluded = frozenset(i for i, name in enumerate(job.classes) if name in cfg.copy_paste_exclude)
            bank = InstanceBank(labeled.image, labeled.mask, job.num_classes, cfg.copy_paste_bank,
                                setup.generator, excluded)
        batches = (setup.per_worker(cfg.batch_size), setup.per_worker(cfg.unlabeled_batch_size))
        step = student_step(model, tuple(labeled), tuple(pseudo), cfg, batches, setup.generator, setup.device, bank)
        return Trainable(model, _finetune_optimizer(model, job.train, setup.device), step)


@dataclass(frozen=True)
class TagClassify(Recipe):
    """An incremental step's tag classifier over the encoder of the model before the step
    (`job.init_state`: that encoder's weights), for the step's classes, which start at
    `first_class` in the setting's class order."""

    tagged: tuple[Path, ...] = shards(Tagged)
    first_class: int = 1

    def build(self, job: JobConfig, setup: WorkerSetup, tagged: Tagged) -> Trainable:
        from pipeline.models.tag_masks import TagClassifier
        from pipeline.models.transunet import ENCODER_PRESETS, HybridEncoder, module_from_state
        from pipeline.train.steps import tag_step

        spec = ENCODER_PRESETS[job.model.preset]
        encoder = module_from_state(lambda: HybridEncoder(spec, initialise=False), job.init_state)
        model = setup.prepare(TagClassifier(encoder, job.num_classes).to(memory_format=torch.channels_last))
        targets = tag_targets(tagged.tags, self.first_class, job.num_classes)
        step = tag_step(model, tagged.image, targets, setup.per_worker(job.train.batch_size), job.train.crop_scale_min,
                        job.train.hflip, setup.generator, setup.device)
        return Trainable(model, _finetune_optimizer(model, job.train, setup.device), step)


@dataclass(frozen=True)
class LearnStep(Recipe):
    """An incremental step's training (`job.init_state`: the model before the step, holding
    `first_class` classes; `job.num_classes` counts the step's new ones too) on its images'
    pseudo masks, with objects of the labeled split's old classes to paste in."""

    masks: tuple[Path, ...] = shards(StepMasked)
    labeled: tuple[Path, ...] = shards(Labeled)
    first_class: int = 1

    def build(self, job: JobConfig, setup: WorkerSetup, masks: StepMasked, labeled: Labeled) -> Trainable:
        from pipeline.models.step_model import StepModel, add_classes
        from pipeline.models.transunet import network_from_state
        from pipeline.train.steps import incremental_step

        cfg: StepTrainConfig = job.train
        previous = network_from_state(job.model, self.first_class, job.init_state).eval().requires_grad_(False)
        # A copy of its own: a network from a state holds the state's very tensors.
        net = network_from_state(job.model, self.first_class, {k: v.clone() for k, v in job.init_state.items()})
        new = job.num_classes - self.first_class
        model = StepModel(add_classes(net, new), new, cfg.plugin_channels if cfg.plugin_teacher else None,
                          embeddings=cfg.dense_contrast_weight > 0)
        model = setup.prepare(model.to(memory_format=torch.channels_last))
        bank = None
        if cfg.copy_paste_probability > 0:
            from pipeline.data.copy_paste import InstanceBank

            bank = InstanceBank(labeled.image, labeled.mask, self.first_class, cfg.copy_paste_bank, setup.generator,
                                frozenset({0}))
        optimizer = _finetune_optimizer(model, cfg, setup.device)

        def steps_done() -> int:
            """The optimizer's own count, which a resumed job restores with it."""
            state = next(iter(optimizer.state.values()), {})
            return int(state.get("step", 0))

        step = incremental_step(model, previous.to(setup.device, memory_format=torch.channels_last), masks.image,
                                masks.masks, cfg, setup.per_worker(cfg.batch_size), setup.generator, setup.device,
                                steps_done, bank)
        return Trainable(model, optimizer, step)
