"""`python -m pipeline.predict` on files, folders and globs, at any image size."""

import pickle
import platform
import re
import shutil
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.models.checkpoints import ENCODER, SEGMENTER, save_weights
from pipeline.config.params import ModelConfig
from pipeline.models.transunet import build_network
from pipeline.predict import load_predictor, main
from pipeline.infer.predictor import Predictor

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


def mlflow_folder(root, weights, image_size=SIZE, classes=CLASSES, weights_path="artifacts/student.pt"):
    """A model folder as `registry.register_segmenter` logs it (MLmodel, weights artifact),
    written by hand so that its python_model.pkl can be a crafted one."""
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    shutil.copy(weights, root / "artifacts" / "student.pt")
    flavor = {"artifacts": {"weights": {"path": weights_path, "uri": str(weights)}},
              "config": {"classes": classes, "format": "", "image_size": image_size},
              "loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl", "code": None,
              "cloudpickle_version": cloudpickle.__version__, "python_version": platform.python_version(),
              "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"}}
    (root / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": flavor}, "mlflow_version": "3"}))
    return root


class _Armed:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling creates the marker file: stands for any code
        return open, (self.marker, "w")


def test_an_mlflow_model_is_read_as_weights_and_metadata_never_unpickled(tmp_path, exported, capsys):
    """`mlflow.pyfunc.load_model` would unpickle python_model.pkl, which runs whatever its
    author put in it. predict reads only the MLmodel file and the weights artifact."""
    marker = tmp_path / "ran"
    armed = cloudpickle.dumps(_Armed(marker))
    pickle.loads(armed)  # the pickle is live: loading it does create the marker
    assert marker.exists()
    marker.unlink()
    model = mlflow_folder(tmp_path / "model", exported[0])
    (model / "python_model.pkl").write_bytes(armed)
    _save(tmp_path / "a.png", np.zeros((20, 30, 3), np.uint8))
    for uri in (model.as_uri(), str(model)):  # file:// URI and a plain folder
        main([str(tmp_path / "a.png"), "--model", uri, "--out", str(tmp_path / "out")])
        assert capsys.readouterr().out.split() == [str(tmp_path / "out" / "a.png")]
        assert not marker.exists()
    net = load_predictor(model.as_uri(), None, "cpu", 4)
    assert (net.classes, net.image_size) == (CLASSES, SIZE)


def _bad_mlflow_models(root, weights):
    mlflow_folder(root / "escapes", weights, weights_path="../student.pt")
    mlflow_folder(root / "size30", weights, image_size=30)
    mlflow_folder(root / "other_classes", weights, classes=["x", "y", "z"])
    (root / "no_weights").mkdir()
    (root / "no_weights" / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {"config": {}}}}))
    (root / "not_yaml").mkdir()
    (root / "not_yaml" / "MLmodel").write_text("flavors: [unclosed\n")
    (root / "empty").mkdir()


# The bad-input cases of the README's table: each is one `error:` line, exit 1, nothing written.
@pytest.mark.parametrize("args, message", [
    (["--classes", "background,disc"], "predicts classes"),
    (["--model", "missing.pt"], "missing.pt: no such weights file"),
    (["--model", "encoder.pt"], "encoder.pt: holds a 'encoder' network"),
    (["--model", "no_config.pt"], "no_config.pt: has no model config"),
    (["--model", "mismatched.pt"], "mismatched.pt: does not fit its own model config: wrong shape"),
    (["--out", "taken.txt"], "--out taken.txt: exists and is not a folder"),
    (["--out", "/dev/null/pred"], "--out /dev/null/pred: cannot be created, /dev/null is not a folder"),
    (["--out", "."], "a.png: is an input image; writing its mask there would overwrite it"),
    (["--batch-size", "0"], "--batch-size 0: expected a positive integer"),
    (["--batch-size", "-1"], "--batch-size -1: expected a positive integer"),
    (["--batch-size", "two"], "argument --batch-size: invalid int value: 'two'"),
    (["--image-size", "30"], "--image-size 30: expected a positive multiple of 16"),
    (["--image-size", "0"], "--image-size 0: expected a positive multiple of 16"),
    (["--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:<index>"),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--model", "models:/missing@champion"], "models:/missing@champion: Registered Model with name=missing not found"),
    (["--model", "runs:/0123abcd/student"], "runs:/0123abcd/student: Run with id=0123abcd not found"),
    (["--model", "nope://model"], "nope://model: Could not find a registered artifact repository"),
    (["--model", "empty"], "empty: not an MLflow model"),
    (["--model", "not_yaml"], "not_yaml: MLmodel is not valid YAML"),
    (["--model", "no_weights"], "no_weights: MLmodel has no python_function weights artifact"),
    (["--model", "escapes"], "escapes: MLmodel weights path '../student.pt': expected a path inside the model"),
    (["--model", "size30"], "size30: MLmodel config image_size 30: expected a positive multiple of 16"),
    (["--model", "other_classes"], "other_classes: MLmodel config classes"),
    (["b.png"], "b.png: not a readable image"),
    (["a_confidence.png", "--confidence"], "a_confidence.png: its output a_confidence.png is also a.png's"),
])
def test_predict_refuses_with_one_line(tmp_path, exported, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _save(tmp_path / "a.png", np.zeros((20, 20, 3), np.uint8))
    (tmp_path / "b.png").write_bytes(b"not an image")
    _save(tmp_path / "a_confidence.png", np.zeros((20, 20, 3), np.uint8))
    (tmp_path / "taken.txt").write_text("")
    save_weights(tmp_path / "encoder.pt", {}, ENCODER, ModelConfig(), None)
    torch.save({"kind": SEGMENTER, "classes": CLASSES, "state_dict": exported[1].state_dict()}, tmp_path / "no_config.pt")
    save_weights(tmp_path / "mismatched.pt", exported[1].state_dict(), SEGMENTER, ModelConfig(), ["bg", "x"])
    _bad_mlflow_models(tmp_path, exported[0])
    before = sorted(tmp_path.rglob("*"))
    more = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))  # more inputs, then options
    argv = ["a.png", *args[:more], "--model", str(exported[0]), "--out", "out", "--image-size", str(SIZE), *args[more:]]
    with pytest.raises(SystemExit, match=re.escape(message)) as exit_info:
        main(argv)
    assert str(exit_info.value).startswith("error: ") and "\n" not in str(exit_info.value)
    assert sorted(p for p in tmp_path.rglob("*") if p.name != "mlflow.db") == before  # nothing written


def test_cheap_arguments_are_checked_before_the_model_or_any_image_is_read(tmp_path, monkeypatch):
    def never(*args):
        raise AssertionError("read before the arguments were checked")

    monkeypatch.setattr("pipeline.predict.load_predictor", never)
    monkeypatch.setattr("pipeline.predict.read_image", never)
    _save(tmp_path / "a.png", np.zeros((20, 20, 3), np.uint8))
    for bad in (["--batch-size", "0"], ["--image-size", "30"], ["--device", "gpu"], ["--out", "/dev/null/x"]):
        with pytest.raises(SystemExit, match="error: --"):
            main([str(tmp_path / "a.png"), "--model", "models:/any@champion", "--out", str(tmp_path / "o"), *bad])


def test_a_bad_image_anywhere_in_the_list_stops_predict_before_it_writes(tmp_path, exported):
    for k in range(5):
        _save(tmp_path / "in" / f"{k}.png", np.full((20, 20, 3), k, np.uint8))
    (tmp_path / "in" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # sorted last: batches 0-3 come first
    with pytest.raises(SystemExit, match="9.png: not a readable image"):
        main([str(tmp_path / "in"), "--model", str(exported[0]), "--out", str(tmp_path / "out"),
              "--image-size", str(SIZE), "--batch-size", "2"])
    assert not (tmp_path / "out").exists()


def test_predict_names_an_input_that_matches_nothing(tmp_path, exported):
    with pytest.raises(SystemExit, match="nothing/\\*.png: no such image, folder, or glob match"):
        main([str(tmp_path / "nothing" / "*.png"), "--model", str(exported[0]), "--out", str(tmp_path / "o"),
              "--image-size", str(SIZE)])


def test_a_full_disk_is_one_line_naming_what_was_written_and_leaves_no_half_file(tmp_path, exported, monkeypatch):
    import errno

    for k in range(2):
        _save(tmp_path / "in" / f"{k}.png", np.full((20, 20, 3), k, np.uint8))
    save, calls = Image.Image.save, []

    def full_disk(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 4:  # the second image's overlay
            Path(fp).write_bytes(b"half a picture")
            raise OSError(errno.ENOSPC, "No space left on device", str(fp))
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "in"), "--model", str(exported[0]), "--out", str(tmp_path / "out"),
              "--image-size", str(SIZE), "--batch-size", "1"])
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message
    assert "No space left on device; the outputs of 1 of 2 images were written before it" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "0_overlay.jpg"]


def test_a_sideways_phone_photo_is_predicted_as_displayed(tmp_path, exported, capsys):
    """Stored 48 wide and 32 high with EXIF orientation 6 (turn 90° clockwise to display): the
    mask must have the displayed size and the prediction of the displayed picture."""
    rng = np.random.default_rng(1)
    displayed = rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)  # 48 high, 32 wide as shown
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(displayed).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    _save(tmp_path / "upright" / "phone.png", np.asarray(Image.open(tmp_path / "phone.png").rotate(-90, expand=True)))
    for source, out in ((tmp_path / "phone.png", "out"), (tmp_path / "upright" / "phone.png", "ref")):
        main([str(source), "--model", str(exported[0]), "--out", str(tmp_path / out), "--image-size", str(SIZE)])
    with Image.open(tmp_path / "out" / "phone.png") as mask, Image.open(tmp_path / "ref" / "phone.png") as reference:
        assert mask.size == (32, 48) and np.array_equal(np.asarray(mask), np.asarray(reference))


def test_a_path_that_exists_is_a_path_even_with_a_colon(tmp_path, monkeypatch):
    from pipeline.predict import is_mlflow_uri

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model:v2.pt").write_bytes(b"")
    (tmp_path / "run:7").mkdir()
    assert not is_mlflow_uri("model:v2.pt") and is_mlflow_uri("run:7")
    assert is_mlflow_uri("models:/seg@champion") and is_mlflow_uri("runs:/abc/student")
    assert not is_mlflow_uri("C:/no/such/student.pt")


def test_an_image_size_off_the_models_token_stride_is_one_line(tmp_path, monkeypatch):
    """The stride-32 hybrid preset at --image-size 48, a multiple of 16 only."""
    monkeypatch.chdir(tmp_path)
    model = ModelConfig(preset="vit_tiny_r_s16_p8", decoder_in_channels=32, decoder_channels=[32, 16, 16, 16, 16])
    save_weights(tmp_path / "hybrid.pt", build_network(model, len(CLASSES)).state_dict(), SEGMENTER, model, CLASSES)
    _save(tmp_path / "a.png", np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(SystemExit, match=re.escape("error: image size 48: this model's encoder has its tokens at "
                                                   "stride 32; expected a multiple of 32")):
        main(["a.png", "--model", "hybrid.pt", "--out", "out", "--image-size", "48"])
    assert not (tmp_path / "out").exists()
