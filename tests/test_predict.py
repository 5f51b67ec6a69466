"""`python -m pipeline.predict` on files, folders and globs, at any image size."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.checkpoints import ENCODER, SEGMENTER, save_weights
from pipeline.config import ModelConfig
from pipeline.models import build_network
from pipeline.predict import Predictor, main

CLASSES = ["background", "disc", "bar"]
SIZE = 32


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    net = build_network(ModelConfig(), len(CLASSES)).eval()
    path = tmp_path / "student.pt"
    save_weights(path, net.state_dict(), SEGMENTER, ModelConfig(), CLASSES)
    return path, net


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def test_predict_writes_masks_overlays_and_confidence_at_each_image_size(tmp_path, exported, capsys):
    rng = np.random.default_rng(0)
    _save(tmp_path / "in" / "wide.png", rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    _save(tmp_path / "in" / "gray.png", rng.integers(0, 256, (64, 64), dtype=np.uint8))
    _save(tmp_path / "more" / "tall.jpg", rng.integers(0, 256, (100, 40, 3), dtype=np.uint8))
    main([str(tmp_path / "in"), str(tmp_path / "more" / "*.jpg"), "--model", str(exported[0]),
          "--out", str(tmp_path / "out"), "--image-size", str(SIZE), "--confidence", "--batch-size", "2"])
    written = capsys.readouterr().out.split()
    assert sorted(written) == sorted(str(tmp_path / "out" / f"{s}.png") for s in ("wide", "gray", "tall"))
    for stem, (h, w) in {"wide": (30, 50), "gray": (64, 64), "tall": (100, 40)}.items():
        with Image.open(tmp_path / "out" / f"{stem}.png") as mask:
            assert mask.mode == "P" and mask.size == (w, h)
            assert np.asarray(mask).max() < len(CLASSES)
        assert Image.open(tmp_path / "out" / f"{stem}_overlay.jpg").size == (w, h)
        assert Image.open(tmp_path / "out" / f"{stem}_confidence.png").size == (w, h)


def test_tiles_are_stitched_back_where_they_came_from(exported):
    """A 2:1 image at the model's size is exactly two squares: each half must be predicted as
    if it were given alone."""
    _, net = exported
    image = np.random.default_rng(1).integers(0, 256, (SIZE, 2 * SIZE, 3), dtype=np.uint8)
    predictor = Predictor(net, CLASSES, SIZE)
    whole = predictor.predict([image])[0]
    left, right = predictor.predict([np.ascontiguousarray(image[:, :SIZE]), np.ascontiguousarray(image[:, SIZE:])])
    assert np.array_equal(whole.labels, np.concatenate([left.labels, right.labels], 1))
    with torch.no_grad():
        x = torch.from_numpy(image[:, :SIZE]).permute(2, 0, 1)[None].float() / 127.5 - 1
        assert np.array_equal(left.labels, net(x).argmax(1)[0].numpy().astype(np.uint8))


@pytest.mark.parametrize("args, message", [
    (["--classes", "background,disc"], "predicts classes"),
    (["--model", "missing.pt"], "missing.pt: no such weights file"),
    (["--model", "encoder.pt"], "encoder.pt: holds a 'encoder' network"),
])
def test_predict_refuses_with_one_line(tmp_path, exported, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    _save(tmp_path / "a.png", np.zeros((20, 20, 3), np.uint8))
    save_weights(tmp_path / "encoder.pt", {}, ENCODER, ModelConfig(), None)
    argv = ["a.png", "--model", str(exported[0]), "--out", "out", "--image-size", str(SIZE), *args]
    with pytest.raises(SystemExit, match=message) as exit_info:
        main(argv)
    assert str(exit_info.value).startswith("error: ") and "\n" not in str(exit_info.value)


def test_predict_names_an_input_that_matches_nothing(tmp_path, exported):
    with pytest.raises(SystemExit, match="nothing/\\*.png: no such image, folder, or glob match"):
        main([str(tmp_path / "nothing" / "*.png"), "--model", str(exported[0]), "--out", str(tmp_path / "o"),
              "--image-size", str(SIZE)])
