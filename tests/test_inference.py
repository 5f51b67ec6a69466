"""Batch inference: the Ray Data pipeline (a pool of model actors) gives exactly what the plain
in-process loop gives, in the same order."""

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig, RayConfig
from pipeline.data import SEGMENTATION_SCHEMA, decode_png, encode_png, write_shards
from pipeline.inference import (
    confusion_and_samples,
    local_predictions,
    pseudo_label_rows,
    ray_predictions,
)
from pipeline.models import build_network

CLASSES = 4
SIZE = 32
COLUMNS = ["id", "image", "mask"]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """23 images in shards of 5 rows (so batches straddle shard boundaries), with masks."""
    rng = np.random.default_rng(0)
    rows = [{"id": f"img{i:03d}", "image": encode_png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)),
             "mask": encode_png(rng.integers(0, CLASSES, (SIZE, SIZE), dtype=np.uint8))} for i in range(23)]
    out = tmp_path_factory.mktemp("split")
    write_shards(rows, SEGMENTATION_SCHEMA, out, 5)
    return out


@pytest.fixture(scope="module")
def states():
    torch.manual_seed(0)
    return {name: build_network(ModelConfig(), CLASSES).state_dict() for name in ("teacher", "student")}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    yield RayConfig(num_workers=1, cpus_per_worker=1, inference_actors=2)
    ray.shutdown()


def _models(states):
    nets = {}
    for name, state in states.items():
        net = build_network(ModelConfig(), CLASSES)
        net.load_state_dict(state)
        nets[name] = net.eval()
    return nets


def test_ray_data_pseudo_labels_and_scores_equal_the_plain_loop(split, states, ray_local):
    plain = list(local_predictions(_models(states), split, COLUMNS, 8, True, "plain"))
    on_ray = list(ray_predictions(states, ModelConfig(), CLASSES, split, COLUMNS, 8, True, ray_local))

    confusion_plain = torch.zeros(CLASSES, CLASSES, dtype=torch.long)
    confusion_ray = torch.zeros(CLASSES, CLASSES, dtype=torch.long)
    rows_plain = list(pseudo_label_rows(iter(plain), "teacher", confusion_plain))
    rows_ray = list(pseudo_label_rows(iter(on_ray), "teacher", confusion_ray))
    assert [r["id"] for r in rows_ray] == [f"img{i:03d}" for i in range(23)]  # the split's order
    assert rows_ray == rows_plain
    assert torch.equal(confusion_ray, confusion_plain) and confusion_plain.sum() == 23 * SIZE * SIZE
    assert len({decode_png(r["confidence"]).tobytes() for r in rows_ray}) == 23  # real, per-image outputs

    scores_plain = confusion_and_samples(iter(plain), ["teacher", "student"], CLASSES, 10)
    scores_ray = confusion_and_samples(iter(on_ray), ["teacher", "student"], CLASSES, 10)
    for name in ("teacher", "student"):
        assert torch.equal(scores_ray[0][name], scores_plain[0][name])
    assert all(torch.equal(scores_ray[1][k], scores_plain[1][k]) for k in scores_plain[1])
    assert scores_ray[1]["image"].shape == (10, 3, SIZE, SIZE) and scores_ray[1]["mask"].shape == (10, SIZE, SIZE)
    assert not torch.equal(scores_plain[0]["teacher"], scores_plain[0]["student"])


def test_flip_tta_changes_the_predictions(split, states):
    models = _models(states)
    plain = next(local_predictions(models, split, COLUMNS, 8, False, "plain"))
    flipped = next(local_predictions(models, split, COLUMNS, 8, True, "plain"))
    assert not np.array_equal(plain["teacher_confidence"], flipped["teacher_confidence"])
