"""Batch inference: the Ray Data pipeline (a pool of model actors) gives exactly what the plain
in-process loop gives, in the same order."""

import numpy as np
import pytest
import torch

from pipeline.config.params import ModelConfig, RayConfig
from pipeline.data.shards import SEGMENTATION_SCHEMA, write_shards
from pipeline.data.png import decode_png, encode_png
from pipeline.infer.batch import (
    counts_and_samples,
    local_predictions,
    pseudo_label_rows,
    ray_predictions,
)
from pipeline.models.transunet import build_network

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
    with ray_predictions(states, ModelConfig(), CLASSES, split, COLUMNS, 8, True, ray_local) as batches:
        on_ray = list(batches)

    confusion_plain = torch.zeros(CLASSES, CLASSES, dtype=torch.long)
    confusion_ray = torch.zeros(CLASSES, CLASSES, dtype=torch.long)
    rows_plain = list(pseudo_label_rows(iter(plain), "teacher", confusion_plain))
    rows_ray = list(pseudo_label_rows(iter(on_ray), "teacher", confusion_ray))
    assert [r["id"] for r in rows_ray] == [f"img{i:03d}" for i in range(23)]  # the split's order
    assert rows_ray == rows_plain
    assert torch.equal(confusion_ray, confusion_plain) and confusion_plain.sum() == 23 * SIZE * SIZE
    assert len({decode_png(r["confidence"]).tobytes() for r in rows_ray}) == 23  # real, per-image outputs

    scores_plain = counts_and_samples(iter(plain), ["teacher", "student"], CLASSES, 10)
    scores_ray = counts_and_samples(iter(on_ray), ["teacher", "student"], CLASSES, 10)
    for name in ("teacher", "student"):
        assert torch.equal(scores_ray[0][name].confusion, scores_plain[0][name].confusion)
        assert torch.equal(scores_ray[0][name].boundary, scores_plain[0][name].boundary)
    assert all(torch.equal(scores_ray[1][k], scores_plain[1][k]) for k in scores_plain[1])
    assert scores_ray[1]["image"].shape == (10, 3, SIZE, SIZE) and scores_ray[1]["mask"].shape == (10, SIZE, SIZE)
    assert not torch.equal(scores_plain[0]["teacher"].confusion, scores_plain[0]["student"].confusion)


def test_flip_tta_changes_the_predictions(split, states):
    models = _models(states)
    plain = next(local_predictions(models, split, COLUMNS, 8, False, "plain"))
    flipped = next(local_predictions(models, split, COLUMNS, 8, True, "plain"))
    assert not np.array_equal(plain["teacher_confidence"], flipped["teacher_confidence"])


@pytest.fixture(scope="module")
def mixed_split(tmp_path_factory):
    """An unlabeled split as a user's folder makes it: a shard of images without masks only (Ray
    Data then sees a column of nulls), and a shard mixing images with and without held-aside masks."""
    rng = np.random.default_rng(1)

    def row(i, with_mask):
        return {"id": f"u{i:03d}", "image": encode_png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)),
                "mask": encode_png(rng.integers(0, CLASSES, (SIZE, SIZE), dtype=np.uint8)) if with_mask else None}

    out = tmp_path_factory.mktemp("mixed")
    write_shards([row(i, with_mask=i >= 6 and i % 2 == 0) for i in range(12)], SEGMENTATION_SCHEMA, out, 6)
    return out


def test_rows_without_masks_in_any_mix_are_labelled_and_only_the_rest_scored(mixed_split, states, ray_local):
    teacher = {"teacher": states["teacher"]}
    plain_confusion = torch.zeros(CLASSES, CLASSES, dtype=torch.long)
    plain = list(pseudo_label_rows(local_predictions(_models(teacher), mixed_split, COLUMNS, 4, False, "plain"),
                                   "teacher", plain_confusion))
    ray_confusion = torch.zeros(CLASSES, CLASSES, dtype=torch.long)
    with ray_predictions(teacher, ModelConfig(), CLASSES, mixed_split, COLUMNS, 4, False, ray_local) as batches:
        on_ray = list(pseudo_label_rows(batches, "teacher", ray_confusion))
    assert [r["id"] for r in on_ray] == [f"u{i:03d}" for i in range(12)] and on_ray == plain
    assert torch.equal(ray_confusion, plain_confusion) and ray_confusion.sum() == 3 * SIZE * SIZE


def test_scoring_an_image_without_its_mask_is_our_error_naming_it(mixed_split, states):
    from pipeline.data.shards import DataError

    batches = local_predictions(_models({"teacher": states["teacher"]}), mixed_split, COLUMNS, 4, False, "plain")
    with pytest.raises(DataError, match="'u000' has no mask"):
        counts_and_samples(batches, ["teacher"], CLASSES, 2)


FAILS_INSIDE_THE_PIPELINE = """
import sys
import time
from pathlib import Path
import torch
from pipeline.config.params import ModelConfig, RayConfig
from pipeline.infer.batch import ray_predictions
from pipeline.models.transunet import build_network

def main():
    states = {"teacher": build_network(ModelConfig(), 4).state_dict()}
    cfg = RayConfig(num_workers=1, cpus_per_worker=1, inference_actors=1)
    with ray_predictions(states, ModelConfig(), 4, Path(sys.argv[1]), ["id", "image", "mask"], 4, False, cfg) as batches:
        for batch in batches:  # the batches stay referenced by this frame, and so by the traceback
            print(f"raised at {time.time()}", flush=True)
            raise RuntimeError("failed on the first batch")

main()
"""


def test_a_failure_while_reading_the_pipeline_ends_the_process_promptly(mixed_split, tmp_path):
    """The pipeline is stopped while Ray is up; left to Python's exit, Ray Data's clean-up would
    start a new Ray and wait forever."""
    import subprocess
    import sys
    import time

    script = tmp_path / "fails.py"
    script.write_text(FAILS_INSIDE_THE_PIPELINE)
    result = subprocess.run([sys.executable, str(script), str(mixed_split)], capture_output=True, text=True,
                            timeout=180, env={**__import__("os").environ, "RAY_USAGE_STATS_ENABLED": "0"})
    ended = time.time()
    assert result.returncode == 1 and "failed on the first batch" in result.stderr
    # Timed from the failure, not from the start: Ray's start-up varies with the machine's load,
    # the wait this guards against comes after the failure.
    raised = float(result.stdout.split("raised at ")[1].split()[0])
    assert ended - raised < 30
    assert "Timeout (" not in result.stderr
