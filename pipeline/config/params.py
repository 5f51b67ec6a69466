"""Typed configuration: one dataclass per `params.yaml` section, validated once at the edge.

`load_params` reads the whole file into a `Params` object. OmegaConf checks keys and types
against the dataclasses (an unknown key or a wrong type names the key); each dataclass's
`__post_init__` checks ranges. Everything raises `ConfigError`, before any work starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config.ablation import ABLATION
from pipeline.config.presets import ENCODER_PRESETS

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A params value is missing, unknown, of the wrong type or out of range."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _positive(section: str, **values: float) -> None:
    for name, value in values.items():
        _require(value > 0, f"{section}.{name}", f"expected a positive number, got {value}")


@dataclass
class DigitScenesConfig:
    """Sizes and looks of the built-in "digit scenes" dataset."""

    train_scenes: int = 2000
    val_scenes: int = 300
    min_digits: int = 2
    max_digits: int = 4
    min_digit_px: int = 16
    max_digit_px: int = 28
    val_digit_fraction: float = 0.25

    def __post_init__(self) -> None:
        _positive("data.digits", train_scenes=self.train_scenes, val_scenes=self.val_scenes,
                  min_digits=self.min_digits, min_digit_px=self.min_digit_px)
        _require(self.min_digits <= self.max_digits, "data.digits.max_digits",
                 f"must be >= min_digits ({self.min_digits}), got {self.max_digits}")
        _require(self.min_digit_px <= self.max_digit_px, "data.digits.max_digit_px",
                 f"must be >= min_digit_px ({self.min_digit_px}), got {self.max_digit_px}")
        _require(0 < self.val_digit_fraction < 1, "data.digits.val_digit_fraction",
                 f"expected a value in (0, 1), got {self.val_digit_fraction}")


@dataclass
class ShapeScenesConfig:
    """Sizes and looks of the built-in "shape scenes" dataset (`pipeline.data.shape_scenes`)."""

    train_scenes: int = 2000
    val_scenes: int = 300
    min_objects: int = 2
    max_objects: int = 5
    min_radius_fraction: float = 0.08  # of the scene's side
    max_radius_fraction: float = 0.22
    min_wire_px: float = 1.5
    max_wire_px: float = 3.0

    def __post_init__(self) -> None:
        _positive("data.shapes", train_scenes=self.train_scenes, val_scenes=self.val_scenes,
                  min_objects=self.min_objects, min_radius_fraction=self.min_radius_fraction,
                  min_wire_px=self.min_wire_px)
        _require(self.min_objects <= self.max_objects, "data.shapes.max_objects",
                 f"must be >= min_objects ({self.min_objects}), got {self.max_objects}")
        _require(self.min_radius_fraction <= self.max_radius_fraction <= 0.5, "data.shapes.max_radius_fraction",
                 f"expected a value in [min_radius_fraction, 0.5], got {self.max_radius_fraction}")
        _require(self.min_wire_px <= self.max_wire_px, "data.shapes.max_wire_px",
                 f"must be >= min_wire_px ({self.min_wire_px}), got {self.max_wire_px}")


BUILT_IN_FORMATS = ("digits", "shapes")  # generated here, no data.root
DATA_FORMATS = (*BUILT_IN_FORMATS, "folder", "cityscapes", "ade20k", "voc", "pascal_context")  # pipeline.data.formats
EXTRA_IMAGES_FORMATS = ("cityscapes", "voc")
FITS = ("crop", "tiles")
MAX_IMAGE_SIZE = 8192  # one 8192² RGB image is 200 MB before any copy; the paper's crops are 512-1024
SEED_LIMIT = 2**32  # numpy's and torch's seeds: whole numbers in [0, 2**32)


@dataclass
class DataConfig:
    """`prepare`: where images come from and how they are split. Images are resized so the
    shorter side is `image_size`, then centre-cropped (`fit: crop`) or cut into squares that
    cover them (`fit: tiles`). The labeled train images are `labeled_ids` (a file of ids)
    when given, else a nested seeded `labeled_fraction`."""

    format: str = "shapes"
    root: str | None = None
    seed: int = 0
    image_size: int = 64
    fit: str = "crop"
    labeled_fraction: float = 0.05
    labeled_ids: str | None = None
    extra_images: bool = False  # Cityscapes train_extra (unlabeled) / VOC's SBD augmented set
    val_fraction: float = 0.15
    # true: a built-in dataset's val split is the tuning split's rather than its held-out val, so
    # hyperparameters are chosen without val (`make run` and the study report the real val): the
    # shape scenes' tuning split holds two train photos out for its val, the digit scenes' val is
    # more scenes of the train digits.
    tuning: bool = False
    shard_rows: int = 1000
    digits: DigitScenesConfig = field(default_factory=DigitScenesConfig)
    shapes: ShapeScenesConfig = field(default_factory=ShapeScenesConfig)

    def __post_init__(self) -> None:
        _require(self.format in DATA_FORMATS, "data.format",
                 f"expected one of {', '.join(map(repr, DATA_FORMATS))}, got {self.format!r}")
        _require(self.format in BUILT_IN_FORMATS or bool(self.root), "data.root",
                 f"data.format {self.format!r} needs data.root, the dataset's folder")
        _require(self.fit in FITS, "data.fit", f"expected 'crop' or 'tiles', got {self.fit!r}")
        _require(not self.extra_images or self.format in EXTRA_IMAGES_FORMATS, "data.extra_images",
                 f"only {' and '.join(EXTRA_IMAGES_FORMATS)} have extra images; data.format is {self.format!r}")
        _require(not self.labeled_ids or self.format not in BUILT_IN_FORMATS, "data.labeled_ids",
                 f"an id list selects images of a dataset on disk; the built-in {self.format} use labeled_fraction")
        _require(not self.tuning or self.format in BUILT_IN_FORMATS, "data.tuning",
                 f"only the built-in datasets make a tuning split; for {self.format} data, hold out some "
                 "labeled train images as its val split yourself")
        _require(0 < self.labeled_fraction <= 1, "data.labeled_fraction",
                 f"expected a value in (0, 1], got {self.labeled_fraction}")
        _require(0 < self.val_fraction < 1, "data.val_fraction",
                 f"expected a value in (0, 1), got {self.val_fraction}")
        _positive("data", image_size=self.image_size, shard_rows=self.shard_rows)
        _require(self.image_size % 16 == 0, "data.image_size",
                 f"expected a multiple of 16 (the encoder's stride), got {self.image_size}")
        _require(self.image_size <= MAX_IMAGE_SIZE, "data.image_size",
                 f"expected at most {MAX_IMAGE_SIZE} px (the shorter side images are resized to), "
                 f"got {self.image_size}")
        _require(0 <= self.seed < SEED_LIMIT, "data.seed",
                 f"expected a whole number in [0, 2**32), got {self.seed}")
        _require(self.format != "digits" or self.digits.min_digit_px <= self.image_size, "data.digits.min_digit_px",
                 f"digits of {self.digits.min_digit_px} px do not fit scenes of {self.image_size} px")


@dataclass
class ModelConfig:
    """The TransUNet family: an encoder preset plus decoder widths."""

    preset: str = "tiny"
    decoder_in_channels: int = 128
    decoder_channels: list[int] = field(default_factory=lambda: [96, 64, 32, 16])

    def __post_init__(self) -> None:
        _require(self.preset in ENCODER_PRESETS, "model.preset",
                 f"expected one of {sorted(ENCODER_PRESETS)}, got {self.preset!r}")
        blocks = ENCODER_PRESETS[self.preset].decoder_blocks
        _require(len(self.decoder_channels) == blocks, "model.decoder_channels",
                 f"expected {blocks} widths (one per decoder block: model.preset {self.preset!r} has its tokens at "
                 f"stride {ENCODER_PRESETS[self.preset].token_stride}), got {list(self.decoder_channels)}")
        _positive("model", decoder_in_channels=self.decoder_in_channels,
                  **{f"decoder_channels[{i}]": c for i, c in enumerate(self.decoder_channels)})


@dataclass
class TrainConfig:
    """What every training stage shares. An epoch is `steps_per_epoch` optimizer steps."""

    epochs: int = 10
    steps_per_epoch: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def _check_schedule(self, section: str) -> None:
        _positive(section, epochs=self.epochs, steps_per_epoch=self.steps_per_epoch,
                  batch_size=self.batch_size, lr=self.lr)
        _require(self.weight_decay >= 0, f"{section}.weight_decay",
                 f"expected a value >= 0, got {self.weight_decay}")


@dataclass
class DenseCLConfig:
    """DenseCL self-supervised encoder pretraining (used when `encoder.init` is 'densecl')."""

    dense_weight: float = 0.5  # λ in L = (1−λ)·L_global + λ·L_dense
    temperature: float = 0.2
    momentum: float = 0.99  # the paper's 0.999 barely moves the key encoder in a few thousand steps
    queue_size: int = 4096
    projection_dim: int = 64

    def __post_init__(self) -> None:
        _require(0 <= self.dense_weight <= 1, "encoder.densecl.dense_weight",
                 f"expected a value in [0, 1], got {self.dense_weight}")
        _require(0 <= self.momentum < 1, "encoder.densecl.momentum",
                 f"expected a value in [0, 1), got {self.momentum}")
        _positive("encoder.densecl", temperature=self.temperature, queue_size=self.queue_size,
                  projection_dim=self.projection_dim)


ENCODER_INITS = ("supervised", "timm", "file", "random", "densecl")
# `encoder.init: supervised` starts from the stand-in encoder shipped here for the preset: trained
# once on another labeled source (letters on photos) by the frozen stage of encoders/dvc.yaml
# (`make standin`), as the paper's encoder comes from ImageNet, never from the task's own labels.
STANDIN_ENCODERS = Path("encoders/weights")


def standin_encoder(preset: str, root: Path = Path(".")) -> Path:
    """The shipped stand-in encoder for `preset`; a `ConfigError` that says what to do when
    there is none (only the presets trained and committed have one)."""
    path = root / STANDIN_ENCODERS / f"{preset}.pt"
    _require(path.is_file(), "encoder.init",
             f"'supervised' starts from the stand-in encoder {STANDIN_ENCODERS}/{preset}.pt, which does not "
             f"exist for model.preset {preset!r}; train one (`python stages/standin_encoder.py --letters 48000 "
             f"--size 32 --set model.preset={preset} --out {STANDIN_ENCODERS}/{preset}.pt`, as encoders/dvc.yaml "
             "does for tiny) or use encoder.init 'timm' (a preset with published ImageNet weights) or 'file'")
    return path


def hub_release_at_hand(name: str) -> None:
    """A `ConfigError` when the hub is offline (HF_HUB_OFFLINE) and the timm release `name` is
    not in its cache: said before any stage runs, not at encoder_init. (Online, only the
    download itself can tell.) timm publishes its releases on the hub as `timm/<name>`."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return
    cached = [try_to_load_from_cache(f"timm/{name}", file) for file in ("model.safetensors", "pytorch_model.bin")]
    _require(any(isinstance(path, str) for path in cached), "encoder.init",
             f"'timm': HF_HUB_OFFLINE is set and {name} is not in the Hugging Face cache {constants.HF_HUB_CACHE}; "
             + release_advice(name))


def release_advice(name: str) -> str:
    """The two ways to a timm release on a machine that cannot download it, as said both before
    the run (`hub_release_at_hand`) and by `encoder_init` itself."""
    return (f"fetch it where there is internet (`python -c \"import timm; timm.create_model('{name}', "
            "pretrained=True)\"`) and copy that cache here, or set encoder.weights_path to a downloaded copy "
            "of the weights file")


@dataclass
class EncoderConfig(TrainConfig):
    """`encoder_init`: how the encoder starts — the shipped stand-in encoder (`supervised`), the
    preset's published ImageNet weights through timm (`timm`: the preset's release or
    `timm_name`, from the Hugging Face hub or its cache, or from `weights_path`, a downloaded
    copy of them), a weights file of the encoder's
    own shape (`file`), random, or DenseCL on the train images. The schedule fields are DenseCL's
    (and, in encoders/params.yaml, the stand-in's classification training)."""

    epochs: int = 30
    steps_per_epoch: int = 100
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    init: str = "supervised"
    weights_path: str | None = None
    timm_name: str | None = None  # `timm`: a published release of the preset's network; null: the preset's own
    densecl: DenseCLConfig = field(default_factory=DenseCLConfig)

    def release(self, preset: str) -> str | None:
        """The timm release `timm` loads for `preset`: `timm_name`, else the preset's own (None: it has none)."""
        return self.timm_name or ENCODER_PRESETS[preset].timm_name

    def __post_init__(self) -> None:
        self._check_schedule("encoder")
        _require(self.init in ENCODER_INITS, "encoder.init",
                 f"expected one of {', '.join(map(repr, ENCODER_INITS))}, got {self.init!r}")
        _require(self.init != "file" or bool(self.weights_path), "encoder.weights_path",
                 "encoder.init 'file' needs a weights file path")


PRETRAIN_MODES = ("ddep", "dep", "none")
DENOISING_TARGETS = ("noise", "image")
PSEUDO_LOSSES = ("self_correction", "ce")
STRONG_OP_COUNT = 14  # len(augment.STRONG_OPS); kept here so validation needs no torch import


@dataclass
class DecoderPretrainConfig(TrainConfig):
    """`decoder_pretrain`: denoising pretraining. `ddep` trains decoder and head over the frozen
    encoder, `dep` trains the whole network, `none` keeps a randomly initialised decoder.

    σ is fixed, or drawn uniformly per example from [sigma, sigma_max] when sigma_max is set.
    """

    mode: str = "ddep"
    epochs: int = 6
    steps_per_epoch: int = 50
    batch_size: int = 32
    lr: float = 3e-3
    sigma: float = 0.2
    sigma_max: float | None = None
    variance_preserving: bool = True  # x̃ = (x + σε)/√(1+σ²); False: x̃ = x + σε
    target: str = "noise"
    sigma_conditioning: bool = False

    def __post_init__(self) -> None:
        self._check_schedule("decoder_pretrain")
        _require(self.mode in PRETRAIN_MODES, "decoder_pretrain.mode",
                 f"expected one of {', '.join(map(repr, PRETRAIN_MODES))}, got {self.mode!r}")
        _require(self.sigma > 0, "decoder_pretrain.sigma", f"expected a positive noise level, got {self.sigma}")
        _require(self.sigma_max is None or self.sigma_max >= self.sigma, "decoder_pretrain.sigma_max",
                 f"expected null (fixed σ) or a value >= sigma ({self.sigma}), got {self.sigma_max}")
        _require(self.target in DENOISING_TARGETS, "decoder_pretrain.target",
                 f"expected 'noise' or 'image', got {self.target!r}")

    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.sigma, self.sigma if self.sigma_max is None else self.sigma_max


@dataclass
class FinetuneConfig(TrainConfig):
    """What teacher and student share: all weights train, the pretrained encoder at
    `encoder_lr_scale` × lr (so a few labels do not wash out what it knows), and the weak
    augmentation of labeled images (inception-style crop down to `crop_scale_min` of the
    area, optional horizontal flip)."""

    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.05
    encoder_lr_scale: float = 0.1
    crop_scale_min: float = 0.7  # stronger zoom makes digits much larger than at test time
    hflip: bool = True

    def _check_finetune(self, section: str) -> None:
        self._check_schedule(section)
        _require(self.encoder_lr_scale >= 0, f"{section}.encoder_lr_scale",
                 f"expected a value >= 0, got {self.encoder_lr_scale}")
        _require(0 < self.crop_scale_min <= 1, f"{section}.crop_scale_min",
                 f"expected a value in (0, 1], got {self.crop_scale_min}")


@dataclass
class TeacherConfig(FinetuneConfig):
    """`teacher_finetune`: cross-entropy on the labeled split."""

    epochs: int = 15  # 1,500 steps: chosen on the shape scenes' tuning split (data.tuning), not on val

    def __post_init__(self) -> None:
        self._check_finetune("teacher")


@dataclass
class PseudoConfig:
    """`pseudo_label`: offline hard labels and confidences from the teacher."""

    batch_size: int = 64
    flip_tta: bool = True

    def __post_init__(self) -> None:
        _positive("pseudo", batch_size=self.batch_size)


@dataclass
class StudentConfig(FinetuneConfig):
    """`student_train`, Simple Baseline's recipe: each step a labeled batch (weak view, CE) and
    a pseudo-labeled batch (strong view, self-correction loss), each piece switchable."""

    epochs: int = 10
    steps_per_epoch: int = 50
    lr: float = 1e-3
    unlabeled_batch_size: int = 16
    pseudo_weight: float = 1.0
    init: str = "teacher"
    strong_augment: bool = True  # RandAugment + zoom 0.5-2x on pseudo-labeled images; False: the weak view
    randaug_ops: int = 3
    dsbn: bool = True  # strongly augmented samples through their own BatchNorms
    pseudo_loss: str = "self_correction"  # or "ce"
    sc_alpha: float = 1.0
    sc_beta: float = 1.0
    sc_confident_above: float | None = 0.8  # w = 1 above it (Simple Baseline's code); null: never
    conf_threshold: float = 0.0  # pseudo-label pixels under this teacher confidence are ignored
    confidence_weighting: bool = False  # scale each pseudo-label pixel's loss by the teacher's confidence
    # Memory-based copy-paste (FMWISS): labeled objects pasted into pseudo-labeled images.
    copy_paste_probability: float = 0.0  # 0 = off
    copy_paste_count: int = 2  # objects per chosen image
    copy_paste_bank: int = 32  # objects kept per class
    copy_paste_exclude: list[str] = field(default_factory=lambda: ["background"])  # classes never pasted
    # Dense contrast (FMWISS / DenseCL) on projected decoder features, class positives.
    dense_contrast_weight: float = 0.0  # λ; 0 = off (FMWISS uses 0.1)
    dense_contrast_temperature: float = 0.1
    dense_contrast_points: int = 10  # sampled pixels per class per batch
    projection_dim: int = 64

    def __post_init__(self) -> None:
        self._check_finetune("student")
        _positive("student", unlabeled_batch_size=self.unlabeled_batch_size)
        _require(self.pseudo_weight >= 0, "student.pseudo_weight",
                 f"expected a value >= 0, got {self.pseudo_weight}")
        _require(0 <= self.conf_threshold < 1, "student.conf_threshold",
                 f"expected a value in [0, 1), got {self.conf_threshold}")
        _require(self.init in ("teacher", "pretrained"), "student.init",
                 f"expected 'teacher' or 'pretrained', got {self.init!r}")
        _require(1 <= self.randaug_ops <= STRONG_OP_COUNT, "student.randaug_ops",
                 f"expected 1 to {STRONG_OP_COUNT} ops per image, got {self.randaug_ops}")
        _require(self.pseudo_loss in PSEUDO_LOSSES, "student.pseudo_loss",
                 f"expected one of {', '.join(map(repr, PSEUDO_LOSSES))}, got {self.pseudo_loss!r}")
        _require(self.sc_alpha >= 0 and self.sc_beta >= 0 and self.sc_alpha + self.sc_beta > 0, "student.sc_alpha",
                 f"expected sc_alpha, sc_beta >= 0 and not both 0, got {self.sc_alpha}, {self.sc_beta}")
        _require(self.sc_confident_above is None or 0 < self.sc_confident_above <= 1, "student.sc_confident_above",
                 f"expected null or a value in (0, 1], got {self.sc_confident_above}")
        _require(0 <= self.copy_paste_probability <= 1, "student.copy_paste_probability",
                 f"expected a value in [0, 1], got {self.copy_paste_probability}")
        _require(self.dense_contrast_weight >= 0, "student.dense_contrast_weight",
                 f"expected a value >= 0, got {self.dense_contrast_weight}")
        _require(self.dense_contrast_temperature > 0, "student.dense_contrast_temperature",
                 f"expected a positive temperature, got {self.dense_contrast_temperature}")
        _positive("student", copy_paste_count=self.copy_paste_count, copy_paste_bank=self.copy_paste_bank,
                  dense_contrast_points=self.dense_contrast_points, projection_dim=self.projection_dim)


ROUND_TEACHER = "teacher"  # round 1 learns from the fine-tuned teacher
INCREMENTAL_PROTOCOLS = ("disjoint", "overlap")  # pipeline.data.incremental


def default_rounds() -> dict[str, str]:
    return {"round1": ROUND_TEACHER}


@dataclass
class SelfTrainingConfig:
    """The self-training rounds, each a `pseudo_label` and a `student_train` stage of its own:
    round name -> the model whose pseudo-labels it learns from. `round2: round1` adds a round in
    which round 1's student is the teacher. A mapping rather than a count because DVC's
    `foreach` can only range over a list or a mapping, and a round's stage must name the
    model before it; no stage depends on this section, so adding a round reruns none of the
    earlier ones."""

    rounds: dict[str, str] = field(default_factory=default_rounds)

    def __post_init__(self) -> None:
        expected = {f"round{k}": ROUND_TEACHER if k == 1 else f"round{k - 1}" for k in range(1, len(self.rounds) + 1)}
        _require(bool(self.rounds) and dict(self.rounds) == expected and list(self.rounds) == list(expected),
                 "self_training.rounds", "expected round1: teacher, then round2: round1, round3: round2, … "
                 f"(each round learns from the one before), got {dict(self.rounds)}")

    @property
    def last(self) -> str:
        return list(self.rounds)[-1]


@dataclass
class TagClassifierConfig(FinetuneConfig):
    """`tag_classifier@<step>`: a multi-label classifier of a step's new classes, trained with BCE
    on its images' tags over the encoder of the model before the step (the encoder at
    `encoder_lr_scale` × lr) under the weak augmentation; its activation maps are the step's
    initial pseudo masks."""

    epochs: int = 5
    steps_per_epoch: int = 100
    batch_size: int = 32
    lr: float = 1e-3

    def __post_init__(self) -> None:
        self._check_finetune("incremental.classifier")


@dataclass
class StepMasksConfig:
    """`pseudo_masks@<step>`: each tagged class's mask from the tag classifier's activation map
    (scaled to a maximum of 1; `background`: the level under which a pixel is background),
    grown by `seeds` points drawn inside it, to the pixels whose features (the denoising
    pretrained network's decoder, self-supervised) have a mean cosine similarity to the seeds'
    above `affinity` (`seeds: 0`: not grown, the initial mask alone). `seed` draws the points,
    per image."""

    background: float = 0.3
    seeds: int = 9  # FMWISS's
    affinity: float = 0.7
    seed: int = 0
    batch_size: int = 32
    # The foundation models FMWISS uses, where the user has them (`pipeline.models.foundation`):
    # `clip`, an open_clip model (`hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K`, `local-dir:/path`,
    # or `ViT-B-16@openai`), whose scores replace the tag classifier's maps; `dino`, a timm
    # self-supervised ViT (`vit_small_patch16_224.dino`; its weights from `dino_weights` where
    # given, else timm's hub), whose last-block attention from the seeds, scaled to a peak of 1,
    # above `attention`, replaces the feature affinity.
    clip: str | None = None
    dino: str | None = None
    dino_weights: str | None = None
    attention: float = 0.5

    @property
    def dino_weights_path(self) -> Path | None:
        return Path(self.dino_weights) if self.dino_weights else None

    def __post_init__(self) -> None:
        _require(self.dino_weights is None or bool(self.dino), "incremental.masks.dino_weights",
                 "expected null without incremental.masks.dino (the timm model they are weights of)")
        _require(0 < self.attention < 1, "incremental.masks.attention", f"expected a value in (0, 1), got {self.attention}")
        _require(0 < self.background < 1, "incremental.masks.background",
                 f"expected a value in (0, 1), got {self.background}")
        _require(-1 <= self.affinity < 1, "incremental.masks.affinity",
                 f"expected a cosine similarity in [-1, 1), got {self.affinity}")
        _positive("incremental.masks", batch_size=self.batch_size)
        _require(isinstance(self.seeds, int) and self.seeds >= 0, "incremental.masks.seeds",
                 f"expected a whole number of points, 0 for the initial masks alone, got {self.seeds}")
        _require(0 <= self.seed < SEED_LIMIT, "incremental.masks.seed",
                 f"expected a whole number in [0, 2**32), got {self.seed}")


@dataclass
class StepTrainConfig(FinetuneConfig):
    """`step_train@<step>` (FMWISS's training of a step): the model before the step, its head
    given a channel per new class, learns with pixel-wise BCE: for the old classes against the
    model before the step (`distill`; off: the old classes are background wherever the new ones
    are not, the forgetting floor), for the new ones against a plug-in teacher (`plugin_teacher`:
    an ASPP head on the decoder's features, dropped from the saved model) that learns from the
    step's pseudo masks with BCE and the dense contrastive loss (`dense_contrast_weight`), from
    its first `warmup_steps` on (before, and with no plug-in teacher, the masks themselves);
    objects of the old classes from the labeled split are pasted in (`copy_paste_probability`)."""

    epochs: int = 5
    steps_per_epoch: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    distill: bool = True
    plugin_teacher: bool = True
    warmup_steps: int = 100
    plugin_channels: int = 64
    dense_contrast_weight: float = 0.1  # FMWISS's λ
    dense_contrast_temperature: float = 0.1
    dense_contrast_points: int = 10
    copy_paste_probability: float = 0.5  # 0 = off
    copy_paste_count: int = 1
    copy_paste_bank: int = 32

    def __post_init__(self) -> None:
        self._check_finetune("incremental.training")
        _require(self.warmup_steps >= 0, "incremental.training.warmup_steps",
                 f"expected a whole number >= 0, got {self.warmup_steps}")
        _require(self.dense_contrast_weight >= 0, "incremental.training.dense_contrast_weight",
                 f"expected a value >= 0, got {self.dense_contrast_weight}")
        _require(self.dense_contrast_temperature > 0, "incremental.training.dense_contrast_temperature",
                 f"expected a positive temperature, got {self.dense_contrast_temperature}")
        _require(0 <= self.copy_paste_probability <= 1, "incremental.training.copy_paste_probability",
                 f"expected a value in [0, 1], got {self.copy_paste_probability}")
        _require(self.plugin_channels % 8 == 0, "incremental.training.plugin_channels",
                 f"expected a positive multiple of 8 (its group norms have 8 groups), got {self.plugin_channels}")
        _positive("incremental.training", plugin_channels=self.plugin_channels,
                  dense_contrast_points=self.dense_contrast_points, copy_paste_count=self.copy_paste_count,
                  copy_paste_bank=self.copy_paste_bank)


# The model the first incremental step learns after: `evaluate`'s export of the last round's student.
FIRST_STEP_AFTER = "student"


@dataclass
class IncrementalStep:
    """One weakly incremental step: the model it learns after (for the first step, the pipeline's
    student, `evaluate`'s `models/student.pt`; then the step before) and the new classes it
    brings, named as the dataset names them."""

    after: str = ""
    classes: list[str] = field(default_factory=list)


@dataclass
class IncrementalConfig:
    """Weakly incremental learning (FMWISS): each entry of `steps` brings new classes that its
    images show only by their tags, never by masks; the pipeline's own stages are step 0 and
    learn every other class (the base classes) from pixel labels. `protocol` decides which train
    images each step gets (`pipeline.data.incremental`: disjoint or overlap). A mapping, as
    `self_training.rounds`, because DVC's `foreach` ranges over one and a step's stages must
    name the model before it (`after`: the first step the pipeline's student, as in
    `step1: {after: student, classes: [...]}`). None (the default): no incremental steps, every
    class is learned from pixel labels."""

    steps: dict[str, IncrementalStep] = field(default_factory=dict)
    protocol: str = "disjoint"
    classifier: TagClassifierConfig = field(default_factory=TagClassifierConfig)
    masks: StepMasksConfig = field(default_factory=StepMasksConfig)
    training: StepTrainConfig = field(default_factory=StepTrainConfig)

    def __post_init__(self) -> None:
        _require(self.protocol in INCREMENTAL_PROTOCOLS, "incremental.protocol",
                 f"expected one of {', '.join(INCREMENTAL_PROTOCOLS)}, got {self.protocol!r}")
        names = list(self.steps)
        expected = [f"step{k}" for k in range(1, len(names) + 1)]
        _require(names == expected, "incremental.steps",
                 f"expected steps named step1, step2, … in order, got {', '.join(names)}")
        seen: dict[str, str] = {}
        for name, step in self.steps.items():
            _require(bool(step.classes), f"incremental.steps.{name}.classes", "expected at least one new class")
            for cls in step.classes:
                _require(cls not in seen, f"incremental.steps.{name}.classes",
                         f"{cls!r} is already new in {seen.get(cls)}; expected each class in one step")
                seen[cls] = name
        for k, (name, step) in enumerate(self.steps.items()):
            before = FIRST_STEP_AFTER if k == 0 else names[k - 1]
            what = "the pipeline's student" if k == 0 else "the step before it"
            _require(step.after == before, f"incremental.steps.{name}.after",
                     f"expected {before!r} ({what}: each step learns after the model before it), got {step.after!r}")


@dataclass
class EvaluateConfig:
    """`evaluate`: metrics and figures on the val split; the student is registered in
    MLflow's model registry as `registered_model` (null: not registered)."""

    batch_size: int = 64
    grid_images: int = 8
    registered_model: str | None = "segmentation-student"

    def __post_init__(self) -> None:
        _positive("evaluate", batch_size=self.batch_size, grid_images=self.grid_images)


@dataclass
class StudyConfig:
    """The label-efficiency study (`python -m pipeline.tools.study`): teacher val mIoU against the
    labeled fraction for four initialisations (random, supervised encoder only, DeP, DDeP),
    and a σ sweep of DDeP and DeP at `sweep_fraction`. Every point is run once per seed (a
    different labeled subset and training seed). A teacher at `fractions[i]` trains for
    `teacher_steps[i]` steps in `teacher_epochs` epochs: the pipeline's own 1,500 (chosen on
    the tuning split at 5%) from 5% up, fewer below (500 steps at 1% are already 400 passes
    over its 20 scenes), 4,000 with every label (where the fully supervised teacher had
    stopped improving).
    At `ablation_fractions` the DDeP teachers also get students, one per step of the
    self-training ablation (pipeline.config.ablation.ABLATION; `ablation_rows` names the steps to
    train, null: all), and the last one `rounds` rounds of self-training in all (round N's
    student relabels the images for round N + 1); and that row with its rounds again for each
    of `student_epochs`, its students trained that many epochs (a longer student: does it learn
    more from the same pseudo-labels?). The study sets its students' length itself, whatever
    params.yaml's `student` trains: every ablation row `ablation_student_epochs` epochs, all of
    `student_steps_per_epoch` steps (10 × 50 = 500: the pieces compared at one short length).
    The DDeP pretraining is also run for `pretrain_epochs` (longer than decoder_pretrain's own
    epochs), each with teachers at `pretrain_fractions`: is the decoder's denoising trained
    long enough to help? `control` (a built-in dataset, or null) gets the same study with
    `control_seeds`, on data the study prepares with the pipeline's `data` settings.
    `tuning_seeds` (empty: none) run the ablation once more on the tuning split
    (`data.tuning`): the row that scores best there is the pipeline's student recipe, chosen
    without looking at val."""

    fractions: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sigmas: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.4, 0.8])
    sweep_fraction: float = 0.05
    ddep_sigma: float = 0.2
    dep_sigma: float = 0.4  # the paper: DeP, trained from scratch, prefers more noise than DDeP
    teacher_steps: list[int] = field(default_factory=lambda: [500, 750, 1500, 1500, 4000])
    teacher_epochs: int = 2
    ablation_fractions: list[float] = field(default_factory=lambda: [0.05])  # the student ablation's
    ablation_rows: list[str] | None = None
    rounds: int = 2
    student_epochs: list[int] = field(default_factory=lambda: [30])
    ablation_student_epochs: int = 10
    student_steps_per_epoch: int = 50
    pretrain_epochs: list[int] = field(default_factory=lambda: [30])
    pretrain_fractions: list[float] = field(default_factory=lambda: [0.05])
    control: str | None = "digits"  # the recognition-bound control beside the default shape scenes
    control_seeds: list[int] = field(default_factory=lambda: [0, 1])
    tuning_seeds: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        for name in ("fractions", "seeds", "sigmas"):
            _require(len(getattr(self, name)) > 0, f"study.{name}", "expected a non-empty list")
        for f in [*self.fractions, self.sweep_fraction]:
            _require(0 < f <= 1, "study.fractions", f"expected fractions in (0, 1], got {f}")
        for sigma in [*self.sigmas, self.ddep_sigma, self.dep_sigma]:
            _require(sigma > 0, "study.sigmas", f"expected positive noise levels, got {sigma}")
        _require(len(self.teacher_steps) == len(self.fractions), "study.teacher_steps",
                 f"expected one step count per fraction ({len(self.fractions)}), got {len(self.teacher_steps)}")
        _require(self.sweep_fraction in self.fractions, "study.sweep_fraction",
                 f"expected one of study.fractions {self.fractions}, got {self.sweep_fraction}")
        _positive("study", teacher_epochs=self.teacher_epochs)
        for name in ("ablation_fractions", "pretrain_fractions"):
            for f in getattr(self, name):
                _require(f in self.fractions, f"study.{name}",
                         f"expected fractions from study.fractions {self.fractions}, got {f}")
        for name in ("pretrain_epochs", "student_epochs", "ablation_student_epochs", "student_steps_per_epoch"):
            values = getattr(self, name)
            for count in values if isinstance(values, list) else [values]:
                _require(isinstance(count, int) and not isinstance(count, bool) and count > 0, f"study.{name}",
                         f"expected positive whole numbers, got {count!r}")
        _require(self.control in (None, *BUILT_IN_FORMATS), "study.control",
                 f"expected one of the built-in datasets {list(BUILT_IN_FORMATS)} or null, got {self.control!r}")
        _require(len(self.control_seeds) > 0, "study.control_seeds", "expected a non-empty list")
        for steps in self.teacher_steps:
            _require(steps > 0 and steps % self.teacher_epochs == 0, "study.teacher_steps",
                     f"expected positive multiples of study.teacher_epochs ({self.teacher_epochs}), got {steps}")
        _require(self.ablation_rows is None or (len(self.ablation_rows) > 0 and set(self.ablation_rows) <= set(ABLATION)),
                 "study.ablation_rows", f"expected null or a non-empty list of {', '.join(ABLATION)}; "
                 f"got {self.ablation_rows}")

        _require(isinstance(self.rounds, int) and not isinstance(self.rounds, bool) and self.rounds >= 1,
                 "study.rounds", f"expected a whole number of self-training rounds, 1 or more; got {self.rounds!r}")

    def steps_for(self, fraction: float) -> int:
        return self.teacher_steps[self.fractions.index(fraction)]

    @property
    def ablation_student_steps(self) -> int:
        return self.ablation_student_epochs * self.student_steps_per_epoch

    @property
    def ablation_steps(self) -> list[str]:
        """The ablation rows the study trains, in the table's order."""
        return [row for row in ABLATION if self.ablation_rows is None or row in self.ablation_rows]


@dataclass
class RayConfig:
    """Where training runs. Read by every stage but not a DVC dependency: a bigger cluster
    must not invalidate the cache. `RAY_ADDRESS` overrides `address`."""

    address: str | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 2
    storage_path: str = "ray_results"
    # Where workers read the Parquet shards: null = the project folder (one machine, or a
    # shared filesystem); a URI (s3://bucket/shards) = content-named copies there.
    data_uri: str | None = None
    max_failures: int = 0
    # Model replicas of batch inference (pseudo_label, evaluate): one GPU each when
    # use_gpu, else cpus_per_worker CPUs each.
    inference_actors: int = 1

    def __post_init__(self) -> None:
        _positive("ray", num_workers=self.num_workers, cpus_per_worker=self.cpus_per_worker,
                  inference_actors=self.inference_actors)
        _require(self.max_failures >= -1, "ray.max_failures",
                 f"expected -1 (retry forever) or a count >= 0, got {self.max_failures}")
        _require(self.data_uri is None or "://" in self.data_uri or self.data_uri.startswith("/"), "ray.data_uri",
                 f"expected null, a URI such as s3://bucket/shards, or an absolute path, got {self.data_uri!r}")

    def resolved_address(self) -> str | None:
        return os.environ.get("RAY_ADDRESS") or self.address


@dataclass
class MlflowConfig:
    """Tracking store. `MLFLOW_TRACKING_URI` overrides `tracking_uri`; the default is a
    SQLite file at an absolute path in the repo, so Ray workers reach the same store."""

    tracking_uri: str | None = None
    experiment: str = "label-efficient-segmentation"


@dataclass
class Params:
    """The whole of `params.yaml`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder_pretrain: DecoderPretrainConfig = field(default_factory=DecoderPretrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    self_training: SelfTrainingConfig = field(default_factory=SelfTrainingConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        preset = self.model.preset
        stride = ENCODER_PRESETS[preset].token_stride
        _require(self.data.image_size % stride == 0, "data.image_size",
                 f"expected a multiple of {stride} (model.preset {preset!r} has its tokens at that stride), "
                 f"got {self.data.image_size}")
        _require(self.encoder.init != "timm" or self.encoder.release(preset) is not None, "encoder.init",
                 f"'timm' loads a preset's published weights, and model.preset {preset!r} has none; presets that do: "
                 + ", ".join(f"{name} ({spec.timm_name})" for name, spec in ENCODER_PRESETS.items() if spec.timm_name))
        workers = self.ray.num_workers
        batches = {f"{name}.batch_size": getattr(self, name).batch_size
                   for name in ("encoder", "decoder_pretrain", "teacher", "student")}
        batches["student.unlabeled_batch_size"] = self.student.unlabeled_batch_size
        if self.incremental.steps:
            batches["incremental.classifier.batch_size"] = self.incremental.classifier.batch_size
            batches["incremental.training.batch_size"] = self.incremental.training.batch_size
        for key, batch in batches.items():
            _require(batch >= workers, key, f"a global batch of {batch} cannot give each of ray.num_workers="
                                            f"{workers} workers an image; use a batch of at least {workers}")


# Mappings taken whole from params.yaml: `dvc.yaml` ranges over them as written.
WHOLE_MAPPINGS = ("self_training.rounds",)


def parse_params(raw: Any, source: str = PARAMS_FILE) -> Params:
    """Validate a params mapping against `Params`; errors name `source` and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Params), raw)
        for key in WHOLE_MAPPINGS:  # as written, not merged into the default (which DVC never sees)
            if (value := OmegaConf.select(OmegaConf.create(raw), key, default=None)) is not None:
                OmegaConf.update(merged, key, value, merge=False)
        _refuse_non_finite(OmegaConf.to_container(merged), "")  # before the range checks, which nan slips
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{source}: {key}: {reason}") from None
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _refuse_non_finite(value: Any, key: str) -> None:
    """Every float in the params, in any section, list or mapping, is finite: `.inf` passes a
    `> 0` range check and `.nan` fails every comparison, so neither is left to them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value}")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        _refuse_non_finite(v, f"{key}[{k}]" if isinstance(value, list) else f"{key}.{k}" if key else str(k))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error
    rather than silently the last value. Only our reading of params files uses it; DVC and
    compose.py read and write params.yaml with their own loaders."""

    def __init__(self, stream, source: str) -> None:
        super().__init__(stream)
        self.source = source
        self.checked: set[int] = set()

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_keys(node, "", ())
        return super().construct_document(node)

    def _check_keys(self, node: yaml.Node, path: str, ancestors: tuple[int, ...]) -> None:
        if id(node) in ancestors:
            raise ConfigError(f"{self.source}: {path or 'the document'} contains itself (a recursive YAML alias); "
                              "expected plain values")
        if id(node) in self.checked:  # an alias of an anchor checked already
            return
        self.checked.add(id(node))
        ancestors = (*ancestors, id(node))
        if isinstance(node, yaml.SequenceNode):
            for k, item in enumerate(node.value):
                self._check_keys(item, f"{path}[{k}]", ancestors)
        elif isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._check_keys(value_node, path, ancestors)
                    continue
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
                key = f"{path}.{name}" if path else name
                line = key_node.start_mark.line + 1
                if name in first:
                    where = f"lines {first[name]} and {line}" if first[name] != line else f"both on line {line}"
                    raise ConfigError(f"{self.source}: {key} is written twice ({where}); "
                                      "expected each key once (YAML would silently keep the last value)")
                first[name] = line
                self._check_keys(value_node, key, ancestors)


def load_params(path: str | Path = PARAMS_FILE, overrides: list[str] = ()) -> Params:
    """Read and validate `params.yaml` (or another file of the same shape), with `key=value`
    overrides (e.g. `decoder_pretrain.sigma=0.4`) applied on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        with path.open("rb") as f:
            loader = _UniqueKeyLoader(f, str(path))
            try:
                raw = loader.get_single_data()
            finally:
                loader.dispose()
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if raw is None:
        raise ConfigError(f"{path}: empty (no params in it); expected the params mapping, e.g. as "
                          "`python -m pipeline.compose` writes it")
    if overrides:
        raw = _apply_overrides(raw, overrides)
    return parse_params(raw, source=str(path) + (f" with {' '.join(overrides)}" if overrides else ""))


def _apply_overrides(raw: dict, overrides: list[str]) -> dict:
    schema = OmegaConf.structured(Params)
    for item in overrides:
        key, sep, _ = item.partition("=")
        _require(bool(sep and key), item, "expected an override of the form section.key=value")
        _require(OmegaConf.select(schema, key, default=_MISSING) is not _MISSING, key,
                 "no such params key (an override can only change an existing one)")
    try:
        return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(raw), OmegaConf.from_dotlist(list(overrides))))
    except OmegaConfBaseException as err:
        raise ConfigError(f"overrides {list(overrides)}: {str(err).splitlines()[0]}") from None


_MISSING = object()


def section_dict(params: Params, section: str) -> dict:
    """One section as a plain dict, e.g. to log it as flattened params."""
    return OmegaConf.to_container(OmegaConf.structured(getattr(params, section)))
