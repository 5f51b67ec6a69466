import re

import numpy as np
import pytest

from pipeline.data.incremental import (
    present_classes,
    read_tags,
    split_classes,
    step_images,
    step_mask,
    step_tags,
)
from pipeline.data.shards import DataError

VOC = 21  # background and 20 object classes


def test_splits_are_named_as_the_field_names_them():
    assert split_classes(VOC, "15-5") == [list(range(1, 16)), list(range(16, 21))]
    assert split_classes(VOC, "15-1") == [list(range(1, 16)), *([c] for c in range(16, 21))]
    assert split_classes(VOC, "10-10") == [list(range(1, 11)), list(range(11, 21))]
    assert split_classes(7, "4-2") == [[1, 2, 3, 4], [5, 6]]


@pytest.mark.parametrize("split", ["15", "a-b", "0-5", "20-1", "15-4", "15-0", "15-5-1"])
def test_a_split_that_does_not_cover_the_classes_in_whole_steps_is_named(split):
    with pytest.raises(DataError, match=f"incremental split '{split}': expected"):
        split_classes(VOC, split)


def test_present_classes_leave_out_background_and_ignored_pixels():
    assert present_classes(np.array([[0, 3, 3], [255, 7, 0]], dtype=np.uint8)) == {3, 7}
    assert present_classes(np.zeros((2, 2), dtype=np.uint8)) == frozenset()


# Steps of "2-1-1" over 4 object classes: base {1, 2}, then {3}, then {4}.
STEPS = [[1, 2], [3], [4]]
PRESENT = {"base": frozenset({1, 2}), "base+3": frozenset({1, 3}), "3+4": frozenset({3, 4}),
           "4": frozenset({4}), "nothing": frozenset()}


def test_disjoint_puts_each_image_in_the_step_of_its_latest_class():
    by_step = [step_images(PRESENT, STEPS, step, "disjoint") for step in range(3)]
    assert by_step == [["base"], ["base+3"], ["3+4", "4"]]


def test_overlap_takes_every_image_holding_one_of_the_steps_classes():
    by_step = [step_images(PRESENT, STEPS, step, "overlap") for step in range(3)]
    assert by_step == [["base", "base+3"], ["base+3", "3+4"], ["3+4", "4"]]


def test_an_unknown_protocol_is_named():
    with pytest.raises(DataError, match="incremental protocol 'mixed': expected one of disjoint, overlap"):
        step_images(PRESENT, STEPS, 1, "mixed")


def test_a_step_sees_only_its_own_classes():
    mask = np.array([[1, 3, 4], [255, 0, 2]], dtype=np.uint8)
    assert step_tags(present_classes(mask), STEPS, 1) == [3]
    assert step_tags(present_classes(mask), STEPS, 0) == [1, 2]
    assert step_mask(mask, STEPS, 0).tolist() == [[1, 0, 0], [255, 0, 2]]
    assert step_mask(mask, STEPS, 2).tolist() == [[0, 0, 4], [255, 0, 0]]
    assert step_mask(mask, STEPS, 2).dtype == np.uint8


CLASSES = ["background", "car", "person", "tree"]
STEMS = ["a", "b", "c"]


def test_tags_csv_is_read_per_stem_in_class_order(tmp_path):
    path = tmp_path / "tags.csv"
    path.write_text("\ufeffa,tree,car\n\nb, person ,person\n", encoding="utf-8")  # BOM, blank line, spaces
    assert read_tags(path, CLASSES, STEMS) == {"a": ["car", "tree"], "b": ["person"]}


@pytest.mark.parametrize("text, message", [
    ("a,car\nzzz,car\n", r"line 2: 'zzz' is not an image stem of the dataset"),
    ("a,car\na,tree\n", r"line 2: 'a' is tagged twice; expected one row per image"),
    ("a,car\nb\n", r"line 2: 'b' has no tag; expected at least one class name after it"),
    ("a,,\n", r"line 1: 'a' has no tag"),
    ("a,bus\n", r"line 1: 'bus' is not an object class of classes.txt; expected one of car, person, tree"),
    ("a,background\n", r"line 1: 'background' is not an object class"),
    ("\n\n", r"tags no image; expected one row per tagged image"),
])
def test_each_problem_in_tags_csv_is_named_with_its_line(tmp_path, text, message):
    path = tmp_path / "tags.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {message}"):
        read_tags(path, CLASSES, STEMS)


def test_a_missing_or_non_utf8_tags_csv_is_named(tmp_path):
    with pytest.raises(DataError, match="tags.csv: missing; expected one row per tagged image"):
        read_tags(tmp_path / "tags.csv", CLASSES, STEMS)
    (tmp_path / "tags.csv").write_bytes(b"a,caf\xe9\n")
    with pytest.raises(DataError, match=r"tags.csv: not UTF-8 text \(byte 0xe9 at offset 5\)"):
        read_tags(tmp_path / "tags.csv", CLASSES, STEMS)
