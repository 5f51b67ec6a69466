"""End to end on data from disk: a user's own folder (images, masks, an `unlabeled/` folder of
images only, a `val/` folder) through the whole DAG with `python -m pipeline.run`; and a failure
inside a Ray Data batch or a training step, which must end the stage at once with exit 1. (Each
benchmark format's prepared splits go through batch inference in process: test_formats.)"""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pipeline_e2e import COPY_IGNORE, ROOT, repo_env, run

pytestmark = pytest.mark.slow

CLASSES = ("background", "disc", "square")  # three: a denoiser's head has three channels too
SIZE = 64
EXIT_WITHIN_S = 90  # a failing stage's whole run, Ray's start included; a hang would run to the timeout


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = (rng.normal(0.5, 0.15, (SIZE, SIZE, 3)).clip(0, 1) * 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for _ in range(rng.integers(1, 4)):
        cls, (cy, cx), r = int(rng.integers(1, 3)), rng.integers(10, SIZE - 10, 2), int(rng.integers(5, 10))
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if cls == 1 else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        image[inside], mask[inside] = rng.integers(0, 256, 3), cls
    return image, mask


def draw_folder_dataset(root: Path) -> None:
    """The README's layout: 12 labeled images, 20 unlabeled ones (one a JPEG stored sideways with
    an EXIF rotation, as phones write them), 6 val images, classes.txt."""
    rng = np.random.default_rng(3)
    for sub in ("images", "masks", "unlabeled", "val/images", "val/masks"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for folder, count in (("", 12), ("val/", 6)):
        for i in range(count):
            image, mask = _scene(rng)
            Image.fromarray(image).save(root / f"{folder}images/{folder[:-1] or 'img'}{i:03d}.png")
            Image.fromarray(mask).save(root / f"{folder}masks/{folder[:-1] or 'img'}{i:03d}.png")
    for i in range(20):
        image = Image.fromarray(_scene(rng)[0])
        if i == 0:
            exif = Image.Exif()
            exif[0x0112] = 6  # Orientation: the viewer turns it 90° clockwise
            image.transpose(Image.Transpose.ROTATE_90).save(root / "unlabeled/phone.jpg", exif=exif)
        else:
            image.save(root / f"unlabeled/u{i:03d}.png")


def fresh_copy(base: Path) -> Path:
    repo = base / "repo"
    shutil.copytree(ROOT, repo, ignore=COPY_IGNORE)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "copy"]):
        run(cmd, repo)
    return repo


@pytest.fixture(scope="module")
def own_data_repo(tmp_path_factory) -> tuple[Path, str]:
    """A fresh copy of the project after the README's recipe on a folder dataset (the smoke
    sizes), half of the train images labeled: the unlabeled split mixes images with held-aside
    masks and `unlabeled/` images without any. Returns the repo and the run's output."""
    base = tmp_path_factory.mktemp("own")
    draw_folder_dataset(base / "my_data")
    repo = fresh_copy(base)
    run([sys.executable, "-m", "pipeline.compose", "dataset=folder", f"data.root={base / 'my_data'}",
         "experiment=smoke", "data.labeled_fraction=0.5"], repo)
    result = run([sys.executable, "-m", "pipeline.run"], repo, timeout=1500)
    return repo, result.stdout + result.stderr


def test_a_folder_with_unlabeled_and_val_runs_the_whole_dag(own_data_repo):
    repo, output = own_data_repo
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert manifest["classes"] == list(CLASSES)
    assert manifest["counts"]["labeled"] == 6 and manifest["counts"]["unlabeled"] == 26 and manifest["counts"]["val"] == 6
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert {"teacher", "student"} <= metrics.keys()
    assert all(0 <= metrics[m]["miou"] <= 1 and list(metrics[m]["per_class_iou"]) for m in ("teacher", "student"))
    pseudo = [line for line in output.splitlines() if line.startswith("[pseudo_label@round1] done:")]
    assert pseudo and "images=26" in pseudo[0] and "pseudo_miou=" in pseudo[0]  # scored on the 6 held-aside masks
    predicted = run([sys.executable, "-m", "pipeline.predict", str(repo.parent / "my_data/val/images/val000.png"),
                     "--model", "models/student.pt", "--out", "pred"], repo)
    assert predicted.stdout.strip().endswith("val000.png") and (repo / "pred/val000.png").is_file()


def _stage(repo: Path, script: str, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, f"stages/{script}.py", *args], cwd=repo, capture_output=True, text=True,
                            env={**repo_env(repo), **(env or {})}, timeout=300)
    return result, time.monotonic() - started


def _corrupt_copy(split: Path, out: Path, column: str, value) -> Path:
    """The split's rows with the first row's `column` replaced by `value`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(split)
    values = table.column(column).to_pylist()
    values[0] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, table.schema.field(column).type))
    out.mkdir(parents=True)
    pq.write_table(table, out / "part-00000.parquet")
    return out


def _assert_failed_promptly(result: subprocess.CompletedProcess, seconds: float, out: Path,
                            last_line: re.Pattern | None = None) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    if last_line is not None:  # our error, raised inside a Ray actor, still one line at the end
        assert last_line.match(result.stderr.splitlines()[-1]), result.stderr[-3000:]
    assert seconds < EXIT_WITHIN_S, f"took {seconds:.0f} s:\n{result.stderr[-3000:]}"
    assert "Timeout (" not in result.stderr  # ended by its own error path, not by the exit watchdog
    assert not out.exists()  # nothing half-written


NOT_A_PNG = re.compile(r"^error: image '\w+': its stored bytes are not a PNG \(\w+\); rerun the stage that wrote the split$")


def test_a_failure_inside_a_pseudo_label_batch_ends_the_stage(own_data_repo, tmp_path):
    repo, _ = own_data_repo
    broken = _corrupt_copy(repo / "data/prepared/unlabeled", tmp_path / "unlabeled", "image", b"not a png")
    result, seconds = _stage(repo, "pseudo_label", "--prepared", "data/prepared", "--teacher",
                             "models/rounds/teacher.pt", "--unlabeled", str(broken), "--out", str(tmp_path / "pseudo"))
    _assert_failed_promptly(result, seconds, tmp_path / "pseudo", NOT_A_PNG)


def test_a_failure_inside_an_evaluate_batch_ends_the_stage(own_data_repo, tmp_path):
    repo, _ = own_data_repo
    prepared = tmp_path / "prepared"
    shutil.copytree(repo / "data/prepared", prepared, ignore=shutil.ignore_patterns("val"))
    _corrupt_copy(repo / "data/prepared/val", prepared / "val", "image", b"not a png")
    result, seconds = _stage(repo, "evaluate", "--prepared", str(prepared), "--rounds", "models/rounds",
                             "--student", str(tmp_path / "student.pt"), "--metrics", str(tmp_path / "metrics.json"),
                             "--per-class", str(tmp_path / "per_class.csv"), "--figures", str(tmp_path / "figures"))
    _assert_failed_promptly(result, seconds, tmp_path / "metrics.json", NOT_A_PNG)


def test_a_failure_inside_a_training_step_ends_the_stage(own_data_repo, tmp_path):
    """A mask value beyond the classes (as a corrupted shard could hold) fails the loss inside
    the worker's first step."""
    import pyarrow.parquet as pq

    from pipeline.data.png import decode_png, encode_png

    repo, _ = own_data_repo
    first = pq.read_table(repo / "data/prepared/labeled").column("mask")[0].as_py()
    bad_mask = decode_png(first).copy()
    bad_mask[:] = len(CLASSES) + 4
    labeled = _corrupt_copy(repo / "data/prepared/labeled", tmp_path / "labeled", "mask", encode_png(bad_mask))
    result, seconds = _stage(repo, "teacher_finetune", "--prepared", "data/prepared", "--labeled", str(labeled),
                             "--pretrained", "models/pretrained.pt", "--out", str(tmp_path / "teacher.pt"),
                             "--set", "teacher.steps_per_epoch=20", "--set", "teacher.epochs=1")
    _assert_failed_promptly(result, seconds, tmp_path / "teacher.pt")
