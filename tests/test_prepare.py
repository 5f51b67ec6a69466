import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.config.params import DataConfig, DigitScenesConfig
from pipeline.data.manifest import MANIFEST
from pipeline.data.png import decode_png
from pipeline.data.prepare import prepare
from pipeline.data.shards import DataError, read_split


def _smoke_cfg(**kw) -> DataConfig:
    return DataConfig(format="digits", digits=DigitScenesConfig(train_scenes=20, val_scenes=4), **kw)


def test_digit_scenes_prepare(tmp_path):
    manifest = prepare(_smoke_cfg(labeled_fraction=0.25), tmp_path / "prepared")
    assert manifest["counts"] == {"labeled": 5, "unlabeled": 15, "val": 4}
    assert manifest["classes"][0] == "background" and manifest["num_classes"] == 11
    on_disk = json.loads((tmp_path / "prepared" / MANIFEST).read_text())
    assert on_disk["ids"]["labeled"] == manifest["ids"]["labeled"]
    masks = read_split(tmp_path / "prepared" / "labeled").column("mask").to_pylist()
    values = np.unique(np.concatenate([decode_png(m).ravel() for m in masks]))
    assert values[0] == 0 and values.max() <= 10 and len(values) > 2
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["labeled", MANIFEST, "unlabeled", "val"]


def test_digit_scenes_are_deterministic(tmp_path):
    a = prepare(_smoke_cfg(), tmp_path / "a")
    b = prepare(_smoke_cfg(), tmp_path / "b")
    assert a["content_sha256"] == b["content_sha256"]
    assert prepare(_smoke_cfg(seed=1), tmp_path / "c")["content_sha256"] != a["content_sha256"]


def _folder_dataset(root, n=10, size=(40, 30)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "unlabeled").mkdir()
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(root / "images" / f"im{i}.jpg")
        mask = np.zeros(size[::-1], np.uint8)
        mask[:, : size[0] // 2] = 1 + i % 2
        mask[0, 0] = 255
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "unlabeled" / f"u{i}.png")


def test_folder_format_ingestion(tmp_path):
    _folder_dataset(tmp_path / "raw")
    cfg = DataConfig(format="folder", root=str(tmp_path / "raw"), image_size=16, labeled_fraction=0.5,
                     val_fraction=0.2)
    manifest = prepare(cfg, tmp_path / "prepared")
    assert manifest["classes"] == ["sky", "road", "car"]
    assert manifest["counts"]["val"] == 2
    assert manifest["counts"]["labeled"] == 4
    assert manifest["counts"]["unlabeled"] == 4 + 3  # the rest of train (masks held aside) + unlabeled/
    labeled = read_split(tmp_path / "prepared" / "labeled")
    mask = decode_png(labeled.column("mask")[0].as_py())
    image = decode_png(labeled.column("image")[0].as_py())
    assert mask.shape == (16, 16) and image.shape == (16, 16, 3)
    assert set(np.unique(mask)) <= {0, 1, 2, 255}
    assert not (tmp_path / "prepared" / "classify").exists()  # no image-level labels made from the task's own


@pytest.mark.parametrize("breakage, message", [
    (lambda root: (root / "masks" / "im3.png").unlink(), "im3.png: missing mask"),
    (lambda root: Image.fromarray(np.full((30, 40), 7, np.uint8)).save(root / "masks" / "im2.png"),
     "im2.png: mask value 7 is not a folder label"),
    (lambda root: (root / "images" / "im1.jpg").write_bytes(b"not an image"), "im1.jpg: not a readable image"),
    (lambda root: Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "masks" / "im4.png"),
     "im4.png: mask mode RGB"),
    (lambda root: Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "im5.png"), "im5.png: mask size"),
    (lambda root: (root / "classes.txt").unlink(), "classes.txt: missing"),
    (lambda root: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "unlabeled" / "u0.jpg"),
     "'unlabeled-u0' occurs twice"),
])
def test_folder_errors_name_the_file(tmp_path, breakage, message):
    _folder_dataset(tmp_path / "raw")
    breakage(tmp_path / "raw")
    cfg = DataConfig(format="folder", root=str(tmp_path / "raw"), image_size=16, labeled_fraction=0.5)
    with pytest.raises(DataError, match=message):
        prepare(cfg, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def _tree(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("out, message", [
    ("work/raw", r"work/raw: prepare's output is data.root itself"),
    ("work/raw/prepared", r"raw/prepared: prepare's output lies inside data.root"),
    ("work/raw/masks", r"raw/masks: prepare's output lies inside data.root"),
    ("work", r"work: prepare's output holds data.root"),
    ("link", r"link \(= .*work/raw\): prepare's output is data.root itself"),
    ("link/prepared", r"link/prepared \(= .*work/raw/prepared\): prepare's output lies inside data.root"),
])
def test_an_output_at_or_around_the_dataset_is_refused_and_the_data_kept(tmp_path, out, message):
    root = tmp_path / "work" / "raw"
    _folder_dataset(root)
    (tmp_path / "link").symlink_to(root, target_is_directory=True)
    before = _tree(tmp_path / "work")
    cfg = DataConfig(format="folder", root=str(root), image_size=16, labeled_fraction=0.5)
    with pytest.raises(DataError, match=message + r" \(.*work/raw\); it would be replaced whole"):
        prepare(cfg, tmp_path / out)
    assert _tree(tmp_path / "work") == before


@pytest.mark.parametrize("existing, message", [
    ({"notes.txt": b"my notes"}, r"notes.txt: exists and is not a folder"),
    ({"mine/a.txt": b"mine", "mine/labeled/x": b""}, r"mine: exists and is not an earlier output of prepare "
                                                      r"\(it holds a.txt\)"),
    ({"mine/labeled/x": b""}, r"mine: exists and is not an earlier output of prepare \(no manifest.json\)"),
    ({"mine/manifest.json": b"{}"}, r"mine: .*\(its manifest.json is not one prepare writes\)"),
    ({"mine/manifest.json": b"not json"}, r"mine: .*\(its manifest.json is not one prepare writes\)"),
])
def test_an_existing_output_that_prepare_did_not_write_is_refused(tmp_path, existing, message):
    for name, content in existing.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    out = tmp_path / next(iter(existing)).split("/")[0]
    before = _tree(tmp_path)
    for cfg in (_smoke_cfg(), DataConfig(format="folder", root=str(tmp_path / "nowhere"), image_size=16)):
        with pytest.raises(DataError, match=message + ".*expected a new path, an empty folder or an earlier output"):
            prepare(cfg, out)
    assert _tree(tmp_path) == before


def test_an_empty_folder_or_an_earlier_output_is_replaced(tmp_path):
    _folder_dataset(tmp_path / "raw")
    (tmp_path / "prepared").mkdir()
    cfg = DataConfig(format="folder", root=str(tmp_path / "raw"), image_size=16, labeled_fraction=0.5)
    first = prepare(cfg, tmp_path / "prepared")
    (tmp_path / "prepared" / ".DS_Store").write_bytes(b"a file manager's")  # hidden files do not count
    (tmp_path / "link").symlink_to(tmp_path / "prepared", target_is_directory=True)
    again = prepare(DataConfig(**{**cfg.__dict__, "labeled_fraction": 1.0}), tmp_path / "link")
    assert first["counts"]["labeled"] < again["counts"]["labeled"] == json.loads(
        (tmp_path / "link" / MANIFEST).read_text())["counts"]["labeled"]


def test_prepare_into_the_dataset_is_one_error_line_and_exit_1(tmp_path):
    from pathlib import Path

    _folder_dataset(tmp_path / "raw")
    (tmp_path / "params.yaml").write_text("data:\n  format: folder\n  root: raw\n  image_size: 16\n"
                                          "  labeled_fraction: 0.5\n")
    before = _tree(tmp_path / "raw")
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(repo / "stages" / "prepare.py"), "--out", "raw"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(repo),
                                 "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: raw: prepare's output is data.root itself (raw)"), \
        result.stderr
    assert _tree(tmp_path / "raw") == before


def test_labeled_subsets_for_a_study_are_nested_and_keep_masks(tmp_path):
    from pipeline.data.prepare import labeled_subset

    prepare(_smoke_cfg(labeled_fraction=0.25), tmp_path / "prepared")
    ids = {}
    for fraction in (0.1, 0.5, 1.0):
        count, _ = labeled_subset(tmp_path / "prepared", fraction, 3, tmp_path / f"s{fraction}", shard_rows=4)
        table = read_split(tmp_path / f"s{fraction}")
        assert count == table.num_rows == round(20 * fraction)
        assert all(m is not None for m in table.column("mask").to_pylist())
        ids[fraction] = set(table.column("id").to_pylist())
    assert ids[0.1] < ids[0.5] < ids[1.0]
    labeled_subset(tmp_path / "prepared", 0.5, 4, tmp_path / "other", shard_rows=4)
    assert set(read_split(tmp_path / "other").column("id").to_pylist()) != ids[0.5]


def test_a_subsets_complement_is_every_other_train_image_with_its_mask_kept_aside(tmp_path):
    from pipeline.data.prepare import labeled_subset

    prepare(_smoke_cfg(labeled_fraction=0.25), tmp_path / "prepared")
    labeled, unlabeled = labeled_subset(tmp_path / "prepared", 0.1, 3, tmp_path / "lab", 4, tmp_path / "rest")
    assert (labeled, unlabeled) == (2, 18)
    lab, rest = read_split(tmp_path / "lab"), read_split(tmp_path / "rest")
    assert not set(lab.column("id").to_pylist()) & set(rest.column("id").to_pylist())
    assert all(m is not None for m in rest.column("mask").to_pylist())
    assert labeled_subset(tmp_path / "prepared", 1.0, 3, tmp_path / "all", 4, tmp_path / "none") == (20, 0)
    assert read_split(tmp_path / "none").num_rows == 0


def test_a_digit_scenes_tuning_val_split_is_more_train_scenes(tmp_path):
    """As for the shape scenes: the val scenes of `data.tuning` are the train scenes that a
    bigger train split would have next (the train digits), and the train split is unchanged."""
    def images(out: str, split: str) -> dict[str, np.ndarray]:
        table = read_split(tmp_path / out / split)
        return {i: decode_png(b) for i, b in zip(table.column("id").to_pylist(), table.column("image").to_pylist())}

    prepare(_smoke_cfg(tuning=True), tmp_path / "tuning")
    prepare(_smoke_cfg(), tmp_path / "plain")
    prepare(DataConfig(format="digits", digits=DigitScenesConfig(train_scenes=24, val_scenes=4)), tmp_path / "more")
    more = images("more", "labeled") | images("more", "unlabeled")
    held_out = images("tuning", "val")
    assert all(np.array_equal(image, more[f"train-{20 + int(i[-5:]):05d}"]) for i, image in held_out.items())
    assert images("tuning", "unlabeled").keys() == images("plain", "unlabeled").keys()
    assert json.loads((tmp_path / "tuning" / MANIFEST).read_text())["tuning"] is True


# Incremental steps: step 0's view of the data, and each later step's tagged images.
SHAPE_STEPS = {"step1": {"after": "student", "classes": ["stripes", "dots"]}}


def _shapes_incremental(tmp_path, protocol: str):
    from pipeline.config.params import parse_params

    params = parse_params({"data": {"shapes": {"train_scenes": 60, "val_scenes": 10}, "labeled_fraction": 0.3},
                           "incremental": {"steps": SHAPE_STEPS, "protocol": protocol}})
    out = tmp_path / protocol
    return prepare(params.data, out, params.incremental), out


def _classes_in(folder) -> list[set[int]]:
    return [set(np.unique(decode_png(m)).tolist()) - {0, 255} for m in read_split(folder).column("mask").to_pylist()]


@pytest.mark.parametrize("protocol", ["disjoint", "overlap"])
def test_an_incremental_prepare_gives_step_0_the_base_classes_and_a_step_its_tags(tmp_path, protocol):
    manifest, out = _shapes_incremental(tmp_path, protocol)
    base, new = {1, 2, 3, 4}, {5, 6}  # wire, blob, ring, star; then stripes and dots, behind them
    assert manifest["classes"] == ["background", "wire", "blob", "ring", "star"] and manifest["num_classes"] == 5
    setting = manifest["incremental"]
    assert setting["classes"][5:] == ["stripes", "dots"] and setting["steps"]["step1"]["classes"] == ["stripes", "dots"]
    # Step 0 sees its classes only: a new class is background in its masks, val's included.
    for split in ("labeled", "unlabeled", "val"):
        assert all(classes <= base for classes in _classes_in(out / split))
    assert any(classes & new for classes in _classes_in(out / "val_all"))
    step = read_split(out / "steps" / "step1")
    held_aside = _classes_in(out / "steps" / "step1")
    assert len(step) == setting["steps"]["step1"]["images"] > 0
    assert [set(tags) for tags in step.column("tags").to_pylist()] == held_aside  # the step's classes shown
    assert all(classes and classes <= new for classes in held_aside)
    step_ids, step0_ids = set(step.column("id").to_pylist()), set(manifest["ids"]["labeled"] + manifest["ids"]["unlabeled"])
    if protocol == "disjoint":  # every train scene in exactly one step (each shows some class)
        assert not step_ids & step0_ids and len(step_ids | step0_ids) == 60
    else:
        assert step_ids & step0_ids


def test_an_earlier_incremental_output_is_replaced_and_rerunning_gives_the_same_bytes(tmp_path):
    first, out = _shapes_incremental(tmp_path, "disjoint")
    again, _ = _shapes_incremental(tmp_path, "disjoint")
    assert again["content_sha256"] == first["content_sha256"]
    plain = prepare(_smoke_cfg(), out)  # the same folder, now without steps
    assert "incremental" not in plain and sorted(p.name for p in out.iterdir()) == ["labeled", MANIFEST, "unlabeled", "val"]


def _tagged_folder(root):
    _folder_dataset(root)  # classes sky (the background), road, car; masks of road or car
    (root / "classes.txt").write_text("sky\nroad\ncar\nbus\n")
    (root / "tags.csv").write_text("u0,bus\nu1,bus,road\n")


def test_a_folder_step_learns_from_the_tags_of_unlabeled_images(tmp_path):
    from pipeline.config.params import IncrementalConfig, IncrementalStep

    _tagged_folder(tmp_path / "raw")
    cfg = DataConfig(format="folder", root=str(tmp_path / "raw"), image_size=16, labeled_fraction=0.5, val_fraction=0.2)
    manifest = prepare(cfg, tmp_path / "prepared", IncrementalConfig({"step1": IncrementalStep("student", ["bus"])}))
    assert manifest["classes"] == ["sky", "road", "car"] and manifest["incremental"]["steps"]["step1"]["images"] == 2
    step = read_split(tmp_path / "prepared" / "steps" / "step1")
    assert step.column("id").to_pylist() == ["unlabeled-u0", "unlabeled-u1"]
    assert step.column("tags").to_pylist() == [[3], [3]] and step.column("mask").to_pylist() == [None, None]
    assert "unlabeled-u2" in manifest["ids"]["unlabeled"]  # untagged: step 0's, to learn from unlabeled


@pytest.mark.parametrize("breakage, message", [
    (lambda root: (root / "tags.csv").unlink(), r"tags.csv: missing; expected one row per tagged image"),
    (lambda root: (root / "tags.csv").write_text("im1,bus\n"), r"tags.csv: line 1: 'im1' is not an image stem"),
    (lambda root: (root / "tags.csv").write_text("u0,road\n"),
     (r"incremental.steps.step1: no train image falls to it under the disjoint protocol; expected images that "
      r"show its classes \(bus\)")),
    (lambda root: (root / "classes.txt").write_text("sky\nroad\ncar\n"),
     r"incremental.steps.step1.classes: 'bus' is not an object class of the dataset; expected one of road, car"),
])
def test_a_folder_steps_tags_that_cannot_be_used_are_named(tmp_path, breakage, message):
    from pipeline.config.params import IncrementalConfig, IncrementalStep

    _tagged_folder(tmp_path / "raw")
    breakage(tmp_path / "raw")
    cfg = DataConfig(format="folder", root=str(tmp_path / "raw"), image_size=16, labeled_fraction=0.5)
    with pytest.raises(DataError, match=message):
        prepare(cfg, tmp_path / "prepared", IncrementalConfig({"step1": IncrementalStep("student", ["bus"])}))
    assert not (tmp_path / "prepared").exists()


def test_two_tagged_images_with_one_id_are_refused_as_any_two_are(tmp_path):
    from pipeline.config.params import IncrementalConfig, IncrementalStep

    _tagged_folder(tmp_path / "raw")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "raw" / "unlabeled" / "u0.jpg")
    cfg = DataConfig(format="folder", root=str(tmp_path / "raw"), image_size=16, labeled_fraction=0.5)
    with pytest.raises(DataError, match="'unlabeled-u0' occurs twice"):
        prepare(cfg, tmp_path / "prepared", IncrementalConfig({"step1": IncrementalStep("student", ["bus"])}))
