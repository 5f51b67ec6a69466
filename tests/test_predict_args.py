"""Any arguments to `python -m pipeline.predict`: it either writes every input's outputs and
exits 0, or answers one `error:` line, exits 1 and writes nothing."""

import contextlib
import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from test_predict import CLASSES, mlflow_folder

from pipeline.models.checkpoints import ENCODER, SEGMENTER, save_weights
from pipeline.config.params import ModelConfig
from pipeline.data.shards import DataError
from pipeline.data.formats import read_image
from pipeline.models.transunet import build_network
from pipeline.predict import main

FIELDS = ["batch", "size", "device", "out", "model", "images"]
DEVICES = [None, "cpu", "cpu:0", "cuda", "cuda:0", "cuda:7", "gpu", "", "mps", "cuda:-1"]
GOOD_OUTS, BAD_OUTS = ["new", "nested", "empty dir"], ["file", "under a file", "/dev/null", "/dev/null/pred"]


def _device_ok(name):
    if name in (None, "cpu", "cpu:0"):
        return True
    return name in ("cuda", "cuda:0", "cuda:7") and torch.cuda.is_available() and (
        name == "cuda" or int(name.split(":")[1]) < torch.cuda.device_count())


def _models(root: Path) -> dict[str, tuple[str, bool]]:
    """name -> (--model value, whether it is a usable model)."""
    torch.manual_seed(0)
    weights = root / "student.pt"
    save_weights(weights, build_network(ModelConfig(), len(CLASSES)).state_dict(), SEGMENTER, ModelConfig(), CLASSES)
    (root / "garbage.pt").write_bytes(b"not weights")
    save_weights(root / "encoder.pt", {}, ENCODER, ModelConfig(), None)
    torch.save({"kind": SEGMENTER, "classes": CLASSES, "state_dict": {}}, root / "no_config.pt")
    folder = mlflow_folder(root / "mlflow_model", weights)
    good = {"weights": str(weights), "mlflow folder": str(folder), "mlflow file uri": folder.as_uri()}
    bad = {name: str(root / name) for name in ("missing.pt", "garbage.pt", "encoder.pt", "no_config.pt")}
    bad |= {uri: uri for uri in ("models:/missing@champion", "runs:/0123/student", "nope://x")}
    return {name: (value, True) for name, value in good.items()} | {name: (value, False) for name, value in bad.items()}


def test_predict_either_writes_every_output_or_answers_one_error_line(tmp_path, monkeypatch):
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    models = _models(tmp_path)
    monkeypatch.chdir(tmp_path)  # no params.yaml here: a weights file needs --image-size
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    outcomes = {"written": 0, "refused": 0}

    # No shrinking: the draws are labelled and small, and shrinking reruns predict for minutes.
    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    @given(st.data(), st.sets(st.sampled_from(FIELDS), max_size=2), st.booleans())
    def check(data, broken, confidence):
        """Each argument is drawn good, or bad for the fields in `broken`."""
        def pick(field, good, bad):
            return data.draw(st.sampled_from(bad if field in broken else good), label=field)

        model = pick("model", [m for m, (_, ok) in models.items() if ok], [m for m, (_, ok) in models.items() if not ok])
        size = pick("size", ["16", "32", *([None] if model.startswith("mlflow") else [])],
                    ["30", "0", "-16", "8", "big", *([None] if model == "weights" else [])])
        batch = pick("batch", ["1", "2", "16"], ["0", "-1", "x", "1.5", ""])
        device = pick("device", [d for d in DEVICES if _device_ok(d)], [d for d in DEVICES if not _device_ok(d)])
        out_kind = pick("out", GOOD_OUTS, BAD_OUTS)
        images = data.draw(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=3))
        if "images" in broken:  # random bytes in place of one of them
            images[data.draw(st.integers(0, len(images) - 1))] = data.draw(st.binary(max_size=48))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            expected = not broken
            (tmp / "in").mkdir()
            for k, image in enumerate(images):
                path = tmp / "in" / f"im{k}.png"
                if isinstance(image, bytes):
                    path.write_bytes(image)
                    with contextlib.suppress(DataError):  # random bytes are (almost surely) no image
                        read_image(path)
                        expected = broken == {"images"}
                else:
                    Image.fromarray(np.random.default_rng(k).integers(0, 256, (*image, 3), dtype=np.uint8)).save(path)
            (tmp / "file").write_text("")
            (tmp / "empty dir").mkdir()
            out = {"new": tmp / "new", "nested": tmp / "a" / "b", "empty dir": tmp / "empty dir",
                   "file": tmp / "file", "under a file": tmp / "file" / "pred"}.get(out_kind, Path(out_kind))
            argv = [str(tmp / "in"), "--model", models[model][0], "--out", str(out), "--batch-size", batch,
                    *([] if size is None else ["--image-size", size]), *([] if device is None else ["--device", device]),
                    *(["--confidence"] if confidence else [])]
            before = set(tmp.rglob("*"))
            stdout = io.StringIO()
            try:
                with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
                    main(argv)
            except SystemExit as exit_:
                message = exit_.code  # sys.exit(str): exit status 1, the string on stderr
                assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, argv
                assert not expected, (argv, message)
                assert set(tmp.rglob("*")) == before, (argv, message)  # nothing written
                outcomes["refused"] += 1
                return
            assert expected, argv
            stems = [f"im{k}" for k in range(len(images))]
            assert sorted(stdout.getvalue().splitlines()) == sorted(str(out / f"{s}.png") for s in stems)
            suffixes = [".png", "_overlay.jpg", *(["_confidence.png"] if confidence else [])]
            assert {p.name for p in out.iterdir()} == {s + suffix for s in stems for suffix in suffixes}
            outcomes["written"] += 1

    check()
    assert outcomes["written"] and outcomes["refused"], outcomes  # both paths were exercised
