"""Val photo by photo: which photo each scene is drawn on, and the table of models' mIoU."""

import re

import numpy as np
import pytest
import torch

from pipeline.config.params import DataConfig, DigitScenesConfig, ModelConfig, ShapeScenesConfig
from pipeline.data import shape_scenes
from pipeline.data.photos import VAL_PHOTOS, load_photos, tuning_photos
from pipeline.data.prepare import prepare
from pipeline.models.checkpoints import SEGMENTER, save_weights
from pipeline.models.transunet import build_network
from pipeline.tools import val_by_photo

CFG = ShapeScenesConfig(train_scenes=40, val_scenes=8)


def test_scene_photo_names_the_photo_a_scene_is_drawn_on():
    """A scene drawn from four copies of the photo `scene_photo` names is the scene itself;
    from four copies of another photo it is not."""
    photos = load_photos(VAL_PHOTOS)
    for index in range(6):
        scene = shape_scenes.make_scene(shape_scenes.scene_rng(0, "val", index), photos, 64, CFG)[0]
        k = shape_scenes.scene_photo(0, "val", index, len(photos))
        for j, photo in enumerate(photos):
            again = shape_scenes.make_scene(shape_scenes.scene_rng(0, "val", index), [photo] * len(photos), 64, CFG)[0]
            assert np.array_equal(again, scene) == (j == k), (index, j, k)


def _model(path, classes=shape_scenes.CLASSES):
    model = ModelConfig()
    save_weights(path, build_network(model, len(classes)).state_dict(), SEGMENTER, model, classes)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare(DataConfig(format="shapes", labeled_fraction=0.25, shapes=CFG), out / "val")
    prepare(DataConfig(format="shapes", labeled_fraction=0.25, tuning=True, shapes=CFG), out / "tuning")
    return out


def _rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()]


def test_each_model_is_scored_on_all_of_val_and_on_each_photos_scenes(prepared, tmp_path, capsys, monkeypatch):
    val_by_photo.main([str(_model(tmp_path / "a.pt")), "--prepared", str(prepared / "val")])
    header, _, row = _rows(capsys.readouterr().out)
    assert header[:2] == ["model", "all val"] and [h.split(" (")[0] for h in header[2:]] == \
        [n.removeprefix("sklearn:") for n in VAL_PHOTOS]
    assert sum(int(h.split("(")[1].split()[0]) for h in header[2:]) == 8
    assert row[0] == "a" and all(0.0 <= float(v) <= 1.0 for v in row[1:])
    # A model that predicts each scene's own mask scores 1 on every photo: each photo's scenes
    # are scored against their own masks.
    masks = {}

    def oracle(net, images, flip_tta):
        key = images.numpy().tobytes()
        return torch.nn.functional.one_hot(masks[key], len(shape_scenes.CLASSES)).permute(0, 3, 1, 2).float()

    from pipeline.data.png import decode_png
    from pipeline.data.shards import read_split
    from pipeline.infer import batch

    val = read_split(prepared / "val" / "val")
    images = torch.from_numpy(np.stack([decode_png(b) for b in val.column("image").to_pylist()])).permute(0, 3, 1, 2)
    masks[images.numpy().tobytes()] = torch.from_numpy(
        np.stack([decode_png(b) for b in val.column("mask").to_pylist()])).long()
    monkeypatch.setattr(batch, "probabilities", oracle)
    val_by_photo.main([str(tmp_path / "a.pt"), "--prepared", str(prepared / "val")])
    scored = [float(v) for v in _rows(capsys.readouterr().out)[2][1:] if v]
    assert scored == [1.0] * (1 + len(VAL_PHOTOS))


def test_a_tuning_splits_val_is_split_by_its_held_out_photos(prepared, tmp_path, capsys):
    val_by_photo.main([str(_model(tmp_path / "a.pt")), "--prepared", str(prepared / "tuning")])
    header = _rows(capsys.readouterr().out)[0]
    assert [h.split(" (")[0] for h in header[2:]] == [n.removeprefix("sklearn:") for n in tuning_photos(0)[1]]


def test_bad_input_is_one_error_line_naming_it(prepared, tmp_path):
    other = _model(tmp_path / "other.pt", ["background", "thing"])
    prepare(DataConfig(format="digits", labeled_fraction=0.25, digits=DigitScenesConfig(train_scenes=20, val_scenes=4)),
            tmp_path / "digits")
    for args, message in [([str(tmp_path / "missing.pt")], f"{tmp_path / 'missing.pt'}: no such weights file"),
                          ([str(other)], f"{other}: classes ['background', 'thing'] differ from {prepared / 'val'}'s"),
                          ([str(other), "--prepared", str(tmp_path)], "manifest.json: missing; run the prepare stage"),
                          ([str(other), "--prepared", str(tmp_path / "digits")],
                           f"{tmp_path / 'digits'}: data.format is 'digits'; val photos exist for the shape scenes only")]:
        with pytest.raises(SystemExit, match=f"^error: .*{re.escape(message)}" if "manifest" in message
                           else f"^error: {re.escape(message)}"):
            val_by_photo.main([*args, *([] if "--prepared" in args else ["--prepared", str(prepared / "val")])])
