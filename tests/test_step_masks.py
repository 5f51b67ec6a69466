import numpy as np
import pytest
import torch
from conftest import DINO

from pipeline.config.params import ModelConfig, StepMasksConfig
from pipeline.data.png import decode_png, encode_png
from pipeline.infer.step_masks import foundation_models, mask_rows, mask_scores, mask_sources, step_masks
from pipeline.models.denoising import DENOISE_CHANNELS
from pipeline.models.tag_masks import TagClassifier
from pipeline.models.transunet import ENCODER_PRESETS, HybridEncoder, build_network

MODEL = ModelConfig(preset="tiny", decoder_in_channels=32, decoder_channels=[16, 8, 8, 8])
FIRST, STEP_CLASSES = 5, 2  # the step's classes are 5 and 6 in the setting's order
NAMES = ["stripes", "dots"]


def _states():
    torch.manual_seed(0)
    return {"classifier": TagClassifier(HybridEncoder(ENCODER_PRESETS["tiny"]), STEP_CLASSES).state_dict(),
            "features": build_network(MODEL, DENOISE_CHANNELS, sigma_conditioning=True).state_dict()}


@pytest.fixture(scope="module", params=["local", "foundation"])
def networks(request):
    """The step's mask sources: the local stand-ins, or CLIP and DINO from weights a test saved."""
    if request.param == "local":
        return mask_sources(_states(), MODEL, NAMES, StepMasksConfig(), torch.device("cpu"))
    folder, _ = request.getfixturevalue("clip_dir")
    weights, _ = request.getfixturevalue("dino_file")
    cfg = StepMasksConfig(clip=f"local-dir:{folder}", dino=DINO, dino_weights=str(weights))
    return mask_sources(foundation_models(cfg, _clip_text(cfg)), MODEL, NAMES, cfg, torch.device("cpu"))


def _clip_text(cfg: StepMasksConfig) -> torch.Tensor:
    """The step's classes as CLIP's zero-shot classifier (tag_classifier's output with `clip`)."""
    from pipeline.models.foundation import clip_text, load_clip

    return clip_text(*load_clip(cfg.clip), NAMES)


def _batch(ids, tags):
    rng = np.random.default_rng(0)
    images = {eid: encode_png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for eid in ("a", "b")}
    tag_column = np.empty(len(ids), dtype=object)  # as Ray Data hands a list column: an array per row
    for row, image_tags in enumerate(tags):
        tag_column[row] = np.array(image_tags, dtype=np.int32)
    return {"id": np.array(ids, dtype=object), "image": np.array([images[i] for i in ids], dtype=object),
            "tags": tag_column}


def test_each_tagged_class_gets_a_mask_and_an_untagged_one_none(networks):
    out = step_masks(networks, _batch(["a", "b"], [[5], [5, 6]]), FIRST, STEP_CLASSES, StepMasksConfig(background=0.2))
    masks = [[decode_png(m) for m in image] for image in out["masks"]]
    assert [len(image) for image in masks] == [2, 2] and masks[0][0].shape == (64, 64)
    assert masks[0][0].any() and not masks[0][1].any()  # "a" is tagged 5 only
    initial = [decode_png(v) for v in out["initial"]]
    assert set(np.unique(initial[0])) <= {0, 5} and set(np.unique(initial[1])) <= {0, 5, 6}
    # The fused mask holds the initial one (a union).
    assert all(((init == FIRST + k) <= (mask > 0)).all() for image, init in zip(masks, initial)
               for k, mask in enumerate(image))


def test_with_no_seeds_a_class_mask_is_its_initial_mask(networks):
    """`seeds: 0`, the ablation's "initial mask only": nothing grown."""
    out = step_masks(networks, _batch(["a", "b"], [[5], [5, 6]]), FIRST, STEP_CLASSES,
                     StepMasksConfig(background=0.2, seeds=0))
    for image, initial in zip(out["masks"], out["initial"]):
        assert all(((decode_png(initial) == FIRST + k) == (decode_png(mask) > 0)).all()
                   for k, mask in enumerate(image))


def test_an_images_masks_do_not_depend_on_its_batch(networks):
    cfg = StepMasksConfig(background=0.2)
    alone = step_masks(networks, _batch(["b"], [[5, 6]]), FIRST, STEP_CLASSES, cfg)
    together = step_masks(networks, _batch(["a", "b"], [[5], [5, 6]]), FIRST, STEP_CLASSES, cfg)
    assert list(alone["masks"][0]) == list(together["masks"][1]) and alone["initial"][0] == together["initial"][1]


def test_the_masks_are_scored_per_class_against_the_held_aside_truth():
    truth = np.zeros((2, 4), np.uint8)
    truth[:, :2] = 5  # class 5 in the left half; class 6 nowhere
    initial = np.zeros((2, 4), np.uint8)
    initial[:, :1] = 5  # a quarter: IoU 0.5
    fused = [(truth == 5).astype(np.uint8), np.zeros((2, 4), np.uint8)]
    fused[1][0, 3] = 1  # class 6 where there is none: IoU 0
    batch = {"id": np.array(["a"], dtype=object), "image": np.array([b"png"], dtype=object),
             "mask": np.array([encode_png(truth)], dtype=object), "tags": [np.array([5, 6])],
             "masks": [[encode_png(m) for m in fused]], "initial": np.array([encode_png(initial)], dtype=object)}
    overlap = np.zeros((2, 2, 2), dtype=np.int64)
    rows = list(mask_rows([batch], FIRST, STEP_CLASSES, overlap))
    assert rows[0]["tags"] == [5, 6] and len(rows[0]["masks"]) == 2
    scores = mask_scores(overlap, ["stripes", "dots"])
    assert scores["initial"]["per_class_iou"] == {"stripes": 0.5}  # "dots": in neither, counts for none
    assert scores["fused"]["per_class_iou"] == {"stripes": 1.0, "dots": 0.0} and scores["fused"]["miou"] == 0.5


def test_the_foundation_models_the_driver_loads_mask_the_same_once_through_rays_serializer(clip_dir, dino_file):
    """The stage's driver loads CLIP and DINO once and hands them to its Ray Data actors through
    Ray's object store, which serializes them with Ray's cloudpickle (a Ray of its own here
    would add ~30 s and test Ray itself)."""
    from ray import cloudpickle

    cfg = StepMasksConfig(clip=f"local-dir:{clip_dir[0]}", dino=DINO, dino_weights=str(dino_file[0]), background=0.2)
    batch = _batch(["a", "b"], [[5], [5, 6]])
    models = foundation_models(cfg, _clip_text(cfg))
    received = cloudpickle.loads(cloudpickle.dumps(models))
    masked = [step_masks(mask_sources(states, MODEL, NAMES, cfg, torch.device("cpu")), batch, FIRST, STEP_CLASSES, cfg)
              for states in (models, received)]
    assert [list(m) for m in masked[0]["masks"]] == [list(m) for m in masked[1]["masks"]]
    assert list(masked[0]["initial"]) == list(masked[1]["initial"])
