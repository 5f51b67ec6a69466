import numpy as np
import pytest
from scipy import ndimage

from pipeline.config.params import DataConfig, ShapeScenesConfig
from pipeline.data import shape_scenes
from pipeline.data.photos import TRAIN_PHOTOS, VAL_PHOTOS, load_photos, tuning_photos
from pipeline.data.png import decode_png
from pipeline.data.prepare import prepare
from pipeline.data.shards import read_split

GREY = 128.0


def _cfg(**kw) -> DataConfig:
    return DataConfig(format="shapes", labeled_fraction=0.25,
                      shapes=ShapeScenesConfig(train_scenes=40, val_scenes=8, **kw))


def test_shape_scenes_prepare_every_class(tmp_path):
    manifest = prepare(_cfg(), tmp_path / "prepared")
    assert manifest["counts"] == {"labeled": 10, "unlabeled": 30, "val": 8}
    assert manifest["classes"] == ["background", "wire", "blob", "ring", "star", "stripes", "dots"]
    masks = [decode_png(m) for split in ("labeled", "unlabeled")
             for m in read_split(tmp_path / "prepared" / split).column("mask").to_pylist()]
    assert set(np.unique(np.concatenate([m.ravel() for m in masks]))) == set(range(7))


def test_shape_scenes_are_deterministic(tmp_path):
    a = prepare(_cfg(), tmp_path / "a")
    assert prepare(_cfg(), tmp_path / "b")["content_sha256"] == a["content_sha256"]
    assert prepare(_cfg(max_objects=3), tmp_path / "c")["content_sha256"] != a["content_sha256"]


def test_val_scenes_are_drawn_on_photos_train_never_uses():
    assert not set(TRAIN_PHOTOS) & set(VAL_PHOTOS)


@pytest.mark.parametrize("label", range(1, len(shape_scenes.CLASSES)))
def test_the_mask_is_where_the_object_is_drawn(label):
    """One object on a flat grey photo: the pixels it covers at least half of are labelled, and
    they are the pixels that changed colour (objects are drawn in colours far from the photo)."""
    cfg = ShapeScenesConfig()
    for index in range(5):
        canvas = np.full((64, 64, 3), GREY, np.float32)
        mask = np.zeros((64, 64), np.uint8)
        shape_scenes._draw_object(np.random.default_rng(index), canvas, mask, label, cfg)
        changed = np.linalg.norm(canvas - GREY, axis=2) >= 50
        assert (mask == label).sum() > 0 and set(np.unique(mask)) == {0, label}
        assert np.mean(changed == (mask == label)) > 0.95


def test_wires_are_thin_and_blobs_are_not():
    """Two erosions (a 5-pixel-wide brush) leave almost nothing of a wire and most of a blob."""
    cfg = ShapeScenesConfig()
    kept = {}
    for label in (1, 2):
        total = left = 0
        for index in range(10):
            mask = np.zeros((64, 64), np.uint8)
            shape_scenes._draw_object(np.random.default_rng(index), np.full((64, 64, 3), GREY, np.float32), mask,
                                      label, cfg)
            total += (mask == label).sum()
            left += ndimage.binary_erosion(mask == label, iterations=2).sum()
        kept[shape_scenes.CLASSES[label]] = left / total
    assert kept["wire"] < 0.05 and kept["blob"] > 0.4, kept


def test_a_tuning_split_holds_two_train_photos_out_for_its_val(tmp_path):
    """`data.tuning`: hyperparameters are chosen on val scenes drawn on two train photos that the
    tuning split's train scenes never use, as val's photos are held out from train's."""
    def images(out: str, splits: tuple[str, ...]) -> dict[str, np.ndarray]:
        tables = [read_split(tmp_path / out / name) for name in splits]
        return {i: decode_png(b) for t in tables for i, b in zip(t.column("id").to_pylist(),
                                                                 t.column("image").to_pylist())}

    train_photos, held_out = tuning_photos(0)
    assert len(held_out) == 2 and sorted((*train_photos, *held_out)) == sorted(TRAIN_PHOTOS)
    assert tuning_photos(0) == tuning_photos(0) and tuning_photos(1) != tuning_photos(0)  # drawn from the seed
    prepare(DataConfig(format="shapes", labeled_fraction=0.25, tuning=True,
                       shapes=ShapeScenesConfig(train_scenes=40, val_scenes=8)), tmp_path / "tuning")
    cfg = ShapeScenesConfig(train_scenes=40, val_scenes=8)
    # Each scene is the one its own seeded draw makes on its split's photos.
    for split, source, photos in ((("labeled", "unlabeled"), "train", train_photos), (("val",), "tuning", held_out)):
        loaded = load_photos(photos)
        for i, image in images("tuning", split).items():
            rng = shape_scenes.scene_rng(0, source, int(i[-5:]))
            assert np.array_equal(image, shape_scenes.make_scene(rng, loaded, 64, cfg)[0]), i
