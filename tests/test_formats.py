"""The public datasets' official layouts, built as tiny fixture trees, through `prepare`: the
class ids that come out are checked pixel by pixel against the formats' conventions."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import formats
from pipeline.config.params import DataConfig
from pipeline.data.shards import DataError, read_split
from pipeline.data.png import decode_png
from pipeline.data.prepare import prepare

H, W = 16, 32  # 1:2 like Cityscapes; image_size=16 keeps every pixel (no resampling)


def _image(path: Path, seed: int, size=(W, H), suffix_mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(suffix_mode).save(path)


def _quadrant_mask(values: tuple[int, int, int, int]) -> np.ndarray:
    """Four vertical bands of raw label values across the width."""
    mask = np.zeros((H, W), np.uint8)
    for k, v in enumerate(values):
        mask[:, k * W // 4:(k + 1) * W // 4] = v
    return mask


def _save_mask(path: Path, mask: np.ndarray, palette: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask, mode="L")
    if palette is not None:
        im = im.convert("P")
        im.putpalette(palette.ravel().tolist())
        im.putdata(mask.ravel().tolist())
    im.save(path)


def _decoded(prepared: Path, split: str) -> dict[str, np.ndarray]:
    table = read_split(prepared / split)
    return {i: None if m is None else decode_png(m) for i, m in zip(table.column("id").to_pylist(), table.column("mask").to_pylist())}


def _tiles(mask: np.ndarray) -> list[np.ndarray]:
    return [mask[:, :H], mask[:, H:]]


# ---- Cityscapes ----------------------------------------------------------------------------

CITYSCAPES_RAW = (7, 26, 1, 33)  # road, car, ego vehicle (ignored), bicycle
CITYSCAPES_TRAIN_IDS = (0, 13, 255, 18)


def _cityscapes(root: Path, extra: bool = False) -> None:
    n = 0
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("lindau",))):
        for city in cities:
            for k in range(2):
                eid = f"{city}_{k:06d}_000019"
                _image(root / "leftImg8bit" / split / city / f"{eid}_leftImg8bit.png", n)
                _save_mask(root / "gtFine" / split / city / f"{eid}_gtFine_labelIds.png", _quadrant_mask(CITYSCAPES_RAW))
                n += 1
    if extra:
        for k in range(3):
            _image(root / "leftImg8bit" / "train_extra" / "erlangen" / f"erlangen_{k:06d}_000019_leftImg8bit.png", 50 + k)


def test_cityscapes_label_ids_become_train_ids_and_tiles_cover_the_image(tmp_path):
    _cityscapes(tmp_path / "cityscapes", extra=True)
    cfg = DataConfig(format="cityscapes", root=str(tmp_path / "cityscapes"), image_size=H, fit="tiles",
                     labeled_fraction=0.5, extra_images=True, shard_rows=3)
    manifest = prepare(cfg, tmp_path / "prepared")
    assert manifest["classes"][0] == "road" and manifest["classes"][13] == "car" and manifest["num_classes"] == 19
    # 4 train images (2 labeled), 2 val images, 3 train_extra; two 16×16 tiles each
    assert manifest["counts"] == {"labeled": 4, "unlabeled": 4 + 6, "val": 4}
    expected = _tiles(np.array(CITYSCAPES_TRAIN_IDS, np.uint8)[_band_index()])
    for split in ("labeled", "val"):
        masks = _decoded(tmp_path / "prepared", split)
        for eid, mask in masks.items():
            assert eid.endswith(("_t0", "_t1"))
            assert np.array_equal(mask, expected[int(eid[-1])]), eid
    labeled = set(_decoded(tmp_path / "prepared", "labeled"))
    sources = {i.rsplit("_t", 1)[0] for i in labeled}
    assert len(sources) == 2 and labeled == {f"{s}_t{k}" for s in sources for k in (0, 1)}  # both tiles of each
    extra = [i for i, m in _decoded(tmp_path / "prepared", "unlabeled").items() if m is None]
    assert len(extra) == 6 and all(i.startswith("erlangen") for i in extra)


def _band_index() -> np.ndarray:
    """Which of the four bands each pixel lies in."""
    return np.broadcast_to(np.arange(W) // (W // 4), (H, W))


def test_cityscapes_crop_keeps_the_centre(tmp_path):
    _cityscapes(tmp_path / "cityscapes")
    cfg = DataConfig(format="cityscapes", root=str(tmp_path / "cityscapes"), image_size=H, labeled_fraction=1.0)
    prepare(cfg, tmp_path / "prepared")
    for mask in _decoded(tmp_path / "prepared", "val").values():
        assert np.array_equal(mask, np.array(CITYSCAPES_TRAIN_IDS, np.uint8)[_band_index()][:, H // 2:H // 2 + H])


@pytest.mark.parametrize("breakage, message", [
    (lambda r: _save_mask(r / "gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png",
                          _quadrant_mask((0, 13, 255, 18))), "lindau_000001_000019_gtFine_labelIds.png: mask value 255 is not a cityscapes label"),
    (lambda r: (r / "gtFine/train/bremen/bremen_000000_000019_gtFine_labelIds.png").unlink(),
     "bremen_000000_000019_gtFine_labelIds.png: missing fine labelIds mask"),
    (lambda r: (r / "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png").write_bytes(b"\x89PNG trunc"),
     "aachen_000001_000019_leftImg8bit.png: not a readable image"),
    (lambda r: _save_mask(r / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png", np.zeros((8, 8), np.uint8)),
     "aachen_000000_000019_gtFine_labelIds.png: mask size"),
])
def test_cityscapes_errors_name_the_file(tmp_path, breakage, message):
    _cityscapes(tmp_path / "cs")
    breakage(tmp_path / "cs")
    cfg = DataConfig(format="cityscapes", root=str(tmp_path / "cs"), image_size=H, labeled_fraction=1.0)
    with pytest.raises(DataError, match=message):
        prepare(cfg, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists() and not list(tmp_path.glob(".prepared*"))


# ---- ADE20K --------------------------------------------------------------------------------

def _ade20k(root: Path) -> None:
    base = root / "ADEChallengeData2016"
    for folder, count in (("training", 4), ("validation", 2)):
        for k in range(count):
            eid = f"ADE_{folder[:5]}_{k:08d}"
            _image(base / "images" / folder / f"{eid}.jpg", k, size=(H, H))
            _save_mask(base / "annotations" / folder / f"{eid}.png", _quadrant_mask((0, 1, 13, 150))[:, :H])


def test_ade20k_zero_is_ignored_and_classes_shift_down(tmp_path):
    _ade20k(tmp_path / "ade")
    manifest = prepare(DataConfig(format="ade20k", root=str(tmp_path / "ade"), image_size=H, labeled_fraction=0.5),
                       tmp_path / "prepared")
    assert manifest["num_classes"] == 150 and manifest["classes"][0] == "wall" and manifest["classes"][149] == "flag"
    expected = np.array((255, 0, 12, 149), np.uint8)[_band_index()][:, :H]
    val = _decoded(tmp_path / "prepared", "val")
    assert len(val) == 2 and all(np.array_equal(m, expected) for m in val.values())


def test_ade20k_value_above_150_names_the_file(tmp_path):
    _ade20k(tmp_path / "ade")
    bad = tmp_path / "ade/ADEChallengeData2016/annotations/training/ADE_train_00000002.png"
    _save_mask(bad, np.full((H, H), 151, np.uint8))
    with pytest.raises(DataError, match="ADE_train_00000002.png: mask value 151 is not a ade20k label"):
        prepare(DataConfig(format="ade20k", root=str(tmp_path / "ade"), image_size=H, labeled_fraction=1.0),
                tmp_path / "prepared")


# ---- Pascal VOC ----------------------------------------------------------------------------

VOC_TRAIN, VOC_VAL, VOC_AUG = ["2007_000032", "2007_000039"], ["2007_000033"], ["2008_000002", "2008_000003", "2007_000032"]


def _voc(root: Path) -> None:
    base = root / "VOCdevkit" / "VOC2012"
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (sets / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    (sets / "trainaug.txt").write_text("\n".join(VOC_AUG) + "\n")
    palette = formats.voc_palette(21)
    for k, eid in enumerate(VOC_TRAIN + VOC_VAL + VOC_AUG):
        _image(base / "JPEGImages" / f"{eid}.jpg", k, size=(H, H))
        _save_mask(base / "SegmentationClassAug" / f"{eid}.png", _quadrant_mask((0, 15, 255, 20))[:, :H])
        if eid in VOC_TRAIN + VOC_VAL:
            _save_mask(base / "SegmentationClass" / f"{eid}.png", _quadrant_mask((0, 15, 255, 20))[:, :H], palette)


def test_voc_palette_masks_are_read_as_indices_and_id_lists_choose_the_labeled_images(tmp_path):
    _voc(tmp_path / "voc")
    mask_file = tmp_path / "voc/VOCdevkit/VOC2012/SegmentationClass/2007_000033.png"
    with Image.open(mask_file) as im:
        assert im.mode == "P" and np.asarray(im.convert("RGB"))[0, W // 4 + 1].tolist() == [192, 128, 128]  # person
    split = tmp_path / "92" / "labeled.txt"
    split.parent.mkdir()
    split.write_text("JPEGImages/2008_000003.jpg SegmentationClass/2008_000003.png\n")  # UniMatch's line format
    cfg = DataConfig(format="voc", root=str(tmp_path / "voc"), image_size=H, extra_images=True,
                     labeled_ids=str(split))
    manifest = prepare(cfg, tmp_path / "prepared")
    assert manifest["classes"][15] == "person"
    assert manifest["ids"]["labeled"] == ["2008_000003"]
    assert sorted(manifest["ids"]["unlabeled"]) == ["2007_000032", "2007_000039", "2008_000002"]
    expected = np.array((0, 15, 255, 20), np.uint8)[_band_index()][:, :H]
    for split_name in ("labeled", "unlabeled", "val"):
        assert all(np.array_equal(m, expected) for m in _decoded(tmp_path / "prepared", split_name).values())


@pytest.mark.parametrize("breakage, message", [
    (lambda r: Image.fromarray(np.zeros((H, H, 3), np.uint8)).save(r / "SegmentationClass/2007_000039.png"),
     "2007_000039.png: mask mode RGB"),
    (lambda r: (r / "JPEGImages/2007_000033.jpg").unlink(), "2007_000033.jpg: missing image"),
    (lambda r: (r / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2007_000032\n"),
     "train.txt: id '2007_000032' is listed twice"),
    (lambda r: _save_mask(r / "SegmentationClass/2007_000032.png", np.full((H, H), 21, np.uint8)),
     "2007_000032.png: mask value 21 is not a voc label"),
])
def test_voc_errors_name_the_file(tmp_path, breakage, message):
    _voc(tmp_path / "voc")
    breakage(tmp_path / "voc/VOCdevkit/VOC2012")
    with pytest.raises(DataError, match=message):
        prepare(DataConfig(format="voc", root=str(tmp_path / "voc"), image_size=H, labeled_fraction=1.0),
                tmp_path / "prepared")


def test_an_id_list_naming_unknown_images_is_refused(tmp_path):
    _voc(tmp_path / "voc")
    (tmp_path / "labeled.txt").write_text("2007_000032\n2099_123456\n")
    cfg = DataConfig(format="voc", root=str(tmp_path / "voc"), image_size=H, labeled_ids=str(tmp_path / "labeled.txt"))
    with pytest.raises(DataError, match="labeled.txt: 1 listed ids are not train images .*2099_123456"):
        prepare(cfg, tmp_path / "prepared")


# ---- Pascal Context (59 classes) -----------------------------------------------------------

def _pascal_context(root: Path) -> None:
    base = root / "VOCdevkit" / "VOC2010"
    sets = base / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2008_000002\n2008_000003\n")
    (sets / "val.txt").write_text("2008_000004\n")
    for k, eid in enumerate(("2008_000002", "2008_000003", "2008_000004")):
        _image(base / "JPEGImages" / f"{eid}.jpg", k, size=(H, H))
        _save_mask(base / "SegmentationClassContext" / f"{eid}.png", _quadrant_mask((0, 1, 37, 59))[:, :H])


def test_pascal_context_59_ignores_background(tmp_path):
    _pascal_context(tmp_path)
    manifest = prepare(DataConfig(format="pascal_context", root=str(tmp_path / "VOCdevkit"), image_size=H,
                                  labeled_fraction=0.5), tmp_path / "prepared")
    assert manifest["num_classes"] == 59 and manifest["classes"][36] == "person"
    expected = np.array((255, 0, 36, 58), np.uint8)[_band_index()][:, :H]
    assert all(np.array_equal(m, expected) for m in _decoded(tmp_path / "prepared", "val").values())


# ---- shared reading rules ------------------------------------------------------------------

def test_images_that_are_not_8_bit_rgb_are_converted(tmp_path):
    for name, array in (("gray.png", np.full((H, H), 7, np.uint8)), ("rgba.png", np.zeros((H, H, 4), np.uint8)),
                        ("deep.png", np.arange(H * H, dtype=np.uint16).reshape(H, H) * 200)):
        Image.fromarray(array).save(tmp_path / name)
        image = formats.read_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (H, H)
    deep = np.asarray(formats.read_image(tmp_path / "deep.png"))[..., 0]
    assert deep.min() == 0 and deep.max() == 255  # 16-bit range stretched, not clipped


def _upright_scene(size: tuple[int, int]) -> tuple[Image.Image, np.ndarray]:
    """A displayed image (width, height) bright above its middle and dark below, and its mask
    as drawn over it: class 0 ('bright') above, class 1 ('dark') below."""
    w, h = size
    mask = np.zeros((h, w), np.uint8)
    mask[h // 2:] = 1
    return Image.fromarray(np.where(mask[..., None] == 0, 230, 20).astype(np.uint8).repeat(3, axis=2)), mask


# EXIF orientation → how the stored pixels are turned from the displayed ones (6: the camera
# was turned clockwise, the viewer rotates 90° clockwise; 8: the other way).
STORED_SIDEWAYS = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def _save_sideways_jpeg(path: Path, displayed: Image.Image, orientation: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    displayed.transpose(STORED_SIDEWAYS[orientation]).save(path, exif=exif, quality=95)


@pytest.mark.parametrize("orientation", [6, 8])
@pytest.mark.parametrize("size", [(16, 32), (32, 32)], ids=["portrait", "square"])
def test_a_photo_stored_sideways_is_read_as_displayed_and_its_mask_aligns(tmp_path, orientation, size):
    root = tmp_path / "photos"
    (root / "classes.txt").parent.mkdir(parents=True)
    (root / "classes.txt").write_text("bright\ndark\n")
    displayed, mask = _upright_scene(size)
    for folder, eid in (("", "a"), ("", "b"), ("val", "c")):
        _save_sideways_jpeg(root / folder / "images" / f"{eid}.jpg", displayed, orientation)
        _save_mask(root / folder / "masks" / f"{eid}.png", mask)
    with Image.open(root / "images" / "a.jpg") as stored:
        assert stored.size == size[::-1] or size[0] == size[1]  # the pixels really lie sideways
    assert formats.read_image(root / "images" / "a.jpg").size == size  # as displayed (also what predict reads)
    prepare(DataConfig(format="folder", root=str(root), image_size=16, labeled_fraction=1.0), tmp_path / "prepared")
    for split in ("labeled", "val"):
        table = read_split(tmp_path / "prepared" / split)
        for image_png, mask_png in zip(table.column("image").to_pylist(), table.column("mask").to_pylist()):
            image, ids = decode_png(image_png)[..., 0].astype(int), decode_png(mask_png)
            assert set(np.unique(ids)) == {0, 1}
            assert image[ids == 0].mean() > 200 and image[ids == 1].mean() < 50  # bright pixels are the bright class


@pytest.mark.parametrize("content, message", [
    ("sky\nroad\nsky\n".encode(), r"classes.txt: class 'sky' is listed twice \(lines 1 and 3\)"),
    ("sky\n\nroad\n  road  \n".encode(), r"classes.txt: class 'road' is listed twice \(lines 3 and 4\)"),
    ("café\nroad\n".encode("latin-1"), r"classes.txt: not UTF-8 text \(byte 0xe9 at offset 3\); "
                                        "expected one class name per line, saved as UTF-8"),
])
def test_a_bad_classes_file_is_named(tmp_path, content, message):
    (tmp_path / "classes.txt").write_bytes(content)
    with pytest.raises(DataError, match=message):
        formats.read_folder_classes(tmp_path)


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    (tmp_path / "classes.txt").write_text("\ufeffbackground\r\nroad\r\n", encoding="utf-8")
    assert formats.read_folder_classes(tmp_path) == ["background", "road"]
    (tmp_path / "labeled.txt").write_text("\ufeff2007_000032\n2007_000039\n", encoding="utf-8")
    assert formats.read_id_list(tmp_path / "labeled.txt") == ["2007_000032", "2007_000039"]


def test_an_id_list_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "labeled.txt").write_bytes("2007_000032\nbild_ä\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"labeled.txt: not UTF-8 text .*expected one image id per line"):
        formats.read_id_list(tmp_path / "labeled.txt")


def test_every_format_has_a_palette_and_a_config_name():
    from pipeline.config.params import BUILT_IN_FORMATS, DATA_FORMATS

    assert set(DATA_FORMATS) == {*BUILT_IN_FORMATS, *formats.FORMATS}
    assert formats.palette_for({"format": "cityscapes", "num_classes": 19})[0].tolist() == [128, 64, 128]
    assert formats.palette_for({"format": "digits", "num_classes": 11})[255].tolist() == [255, 255, 255]


# ---- each format's prepared splits through batch inference ------------------------------------

@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    """A run in a tracking store of its own (no global MLflow state touched)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")
    return client, client.create_run(client.create_experiment("formats")).info.run_id


@pytest.mark.parametrize("data_format", ["cityscapes", "ade20k", "voc", "pascal_context"])
def test_each_formats_prepared_splits_are_pseudo_labelled_and_scored(tmp_path, data_format, mlflow_run):
    """The format's fixture tree as the smoke preset prepares it, half of its train images
    labeled, through the plain inference loop the stages' Ray Data pipeline equals (test_batch):
    every unlabeled image gets a pseudo-label, scored where its mask is held aside (Cityscapes'
    train_extra images have none), and every val image is scored, its ignored pixels left out."""
    import torch
    from mlflow.entities import Metric

    from pipeline.compose import compose
    from pipeline.infer.batch import evaluate_split, local_predictions, pseudo_label_rows
    from pipeline.infer.figures import confusion_figure, per_class_bars, prediction_grid
    from pipeline.models.transunet import build_network

    build = {"cityscapes": _cityscapes, "ade20k": _ade20k, "voc": _voc, "pascal_context": _pascal_context}[data_format]
    build(tmp_path / "raw", **({"extra": True} if data_format == "cityscapes" else {}))
    extra = ["data.extra_images=true"] if data_format in ("cityscapes", "voc") else []
    params = compose([f"dataset={data_format}", f"data.root={tmp_path / 'raw'}", "experiment=smoke", "data.image_size=32",
                      "data.fit=crop", "data.labeled_fraction=0.5", *extra])
    manifest = prepare(params.data, tmp_path / "prepared")
    classes = manifest["classes"]
    torch.manual_seed(0)
    teacher = build_network(params.model, len(classes)).eval()
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    batches = local_predictions({"teacher": teacher}, tmp_path / "prepared" / "unlabeled", ["id", "image", "mask"], 4,
                                params.pseudo.flip_tta, "pseudo")
    rows = list(pseudo_label_rows(batches, "teacher", confusion))
    unlabeled = _decoded(tmp_path / "prepared", "unlabeled")
    assert [r["id"] for r in rows] == list(unlabeled) and len(rows) == manifest["counts"]["unlabeled"]
    held = [m for m in unlabeled.values() if m is not None]
    assert held and (len(held) < len(rows)) == (data_format == "cityscapes")  # only train_extra comes without masks
    assert confusion.sum() == sum(int((m != 255).sum()) for m in held)
    counts, samples = evaluate_split({"teacher": teacher}, tmp_path / "prepared" / "val", 4, len(classes), 2)
    val = _decoded(tmp_path / "prepared", "val")
    assert counts["teacher"].confusion.sum() == sum(int((m != 255).sum()) for m in val.values()) > 0
    scores = {"teacher": counts["teacher"].scores(classes)}
    assert 0 <= scores["teacher"]["miou"] <= 1
    # evaluate's figures in the format's own palette and class names (19, 150, 21 or 59 of them)
    figures = tmp_path / "figures"
    confusion_figure(counts["teacher"].confusion.numpy(), classes, "teacher", figures / "confusion_teacher.png")
    per_class_bars(scores, classes, figures / "per_class_iou.png")
    prediction_grid(samples["image"], {"truth": samples["mask"], "teacher": samples["teacher"]},
                    formats.palette_for(manifest), classes, figures / "predictions.png")
    assert all((figures / name).stat().st_size > 1000 for name in ("confusion_teacher.png", "per_class_iou.png", "predictions.png"))
    # and every class's per-class metric name is one MLflow accepts, as evaluate logs it
    client, run_id = mlflow_run
    client.log_batch(run_id, metrics=[Metric(f"teacher_iou.{c}", 0.5, 0, 0) for c in classes])


# ---- property: folder ingestion never fails with anything but our error ----------------------

def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    import io

    image = Image.fromarray(array)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder_tree(draw) -> dict:
    """A valid folder dataset of random sizes, image modes and labels, then up to two random
    breakages: random bytes for a file, a mask of another size or mode, any label values,
    a missing mask, a single class."""
    from hypothesis import strategies as st

    num_classes = draw(st.integers(2, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    files = {"classes.txt": "\n".join(f"c{k}" for k in range(num_classes)).encode()}
    for k in range(draw(st.integers(2, 6))):
        w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        mode = draw(st.sampled_from(["RGB", "L", "RGBA", "I;16", "1", "P"]))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        files[f"images/im{k}.png"] = (_png(rng.integers(0, 65536, (h, w), dtype=np.uint16)) if mode == "I;16"
                                      else _png(pixels, mode))
        labels = rng.integers(0, num_classes, (h, w), dtype=np.uint8)
        labels[rng.random((h, w)) < 0.1] = 255
        files[f"masks/im{k}.png"] = _png(labels)
    names = sorted(n for n in files if n != "classes.txt")
    for _ in range(draw(st.integers(0, 2))):
        target = draw(st.sampled_from(names))
        breakage = draw(st.sampled_from(["bytes", "size", "rgb", "values", "missing", "one class"]))
        if breakage == "bytes":
            files[target] = draw(st.binary(max_size=64))
        elif breakage == "size" and target.startswith("masks/"):
            files[target] = _png(np.zeros((draw(st.integers(1, 40)), draw(st.integers(1, 40))), np.uint8))
        elif breakage == "rgb" and target.startswith("masks/"):
            files[target] = _png(np.zeros((4, 4, 3), np.uint8))
        elif breakage == "values" and target.startswith("masks/"):
            with Image.open(__import__("io").BytesIO(files[target])) as im:
                files[target] = _png(rng.integers(0, 256, (im.height, im.width), dtype=np.uint8))
        elif breakage == "missing":
            files.pop(target, None)
        elif breakage == "one class":
            files["classes.txt"] = b"only\n"
    return files


def test_folder_ingestion_either_writes_valid_shards_or_raises_our_error():
    import tempfile

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    outcomes = {"written": 0, "refused": 0}

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
    @given(st.data(), st.floats(0.05, 1.0))
    def check(data, fraction):
        files = _folder_tree(data.draw)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "raw"
            for name, content in files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(content)
            cfg = DataConfig(format="folder", root=str(root), image_size=16, labeled_fraction=fraction, val_fraction=0.3)
            try:
                manifest = prepare(cfg, Path(tmp) / "prepared")
            except DataError:
                assert not (Path(tmp) / "prepared").exists()
                outcomes["refused"] += 1
                return
            outcomes["written"] += 1
            for split in ("labeled", "val"):
                for mask in _decoded(Path(tmp) / "prepared", split).values():
                    assert mask.shape == (16, 16)
                    assert ((mask < manifest["num_classes"]) | (mask == 255)).all()

    check()
    assert outcomes["written"] and outcomes["refused"], outcomes  # both paths were exercised
