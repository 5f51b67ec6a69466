import re

import numpy as np
import pytest

from pipeline.data.formats import VOC_CLASSES
from pipeline.data.incremental import (
    present_classes,
    read_tags,
    step_classes,
    step_mask,
    step_tags,
    steps_of,
    tag_targets,
)
from pipeline.data.shards import DataError

VOC = list(VOC_CLASSES)


def test_voc_15_5_keeps_the_order_and_15_1_too():
    setting = step_classes(VOC, {"step1": ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]})
    assert setting.names == VOC and setting.steps == [list(range(1, 16)), list(range(16, 21))]
    assert setting.table[:21].tolist() == list(range(21)) and setting.table[255] == 255
    one_by_one = step_classes(VOC, {f"step{k}": [name] for k, name in enumerate(VOC[16:], 1)})
    assert one_by_one.steps == [list(range(1, 16)), *([c] for c in range(16, 21))]


def test_new_classes_move_behind_the_base_classes_in_the_order_listed():
    setting = step_classes(["bg", "a", "b", "c", "d"], {"step1": ["c", "a"]})
    assert setting.names == ["bg", "b", "d", "c", "a"] and setting.steps == [[1, 2], [3, 4]]
    mask = np.array([[0, 1, 2], [3, 4, 255]], dtype=np.uint8)
    assert setting.remap(mask).tolist() == [[0, 4, 1], [3, 2, 255]]


@pytest.mark.parametrize("new, message", [
    ({"step1": ["bus"]}, (r"incremental.steps.step1.classes: 'bus' is not an object class of the dataset; "
                          r"expected one of a, b")),
    ({"step1": ["bg"]}, r"incremental.steps.step1.classes: 'bg' is not an object class"),
    ({"step1": ["a"], "step2": ["b"]}, r"incremental.steps: every object class is new in some step"),
])
def test_a_step_naming_no_usable_class_is_named(new, message):
    with pytest.raises(DataError, match=message):
        step_classes(["bg", "a", "b"], new)


def test_present_classes_leave_out_background_and_ignored_pixels():
    assert present_classes(np.array([[0, 3, 3], [255, 7, 0]], dtype=np.uint8)) == {3, 7}
    assert present_classes(np.zeros((2, 2), dtype=np.uint8)) == frozenset()


# Base classes {1, 2}, then a step of {3}, then one of {4}.
STEPS = [[1, 2], [3], [4]]
PRESENT = {"base": frozenset({1, 2}), "base+3": frozenset({1, 3}), "3+4": frozenset({3, 4}),
           "4": frozenset({4}), "nothing": frozenset()}


def images_by_step(protocol: str) -> list[list[str]]:
    return [[eid for eid, classes in PRESENT.items() if step in steps_of(classes, STEPS, protocol)]
            for step in range(len(STEPS))]


def test_disjoint_puts_each_image_in_the_step_of_its_latest_class():
    assert images_by_step("disjoint") == [["base"], ["base+3"], ["3+4", "4"]]


def test_overlap_takes_every_image_holding_one_of_the_steps_classes():
    assert images_by_step("overlap") == [["base", "base+3"], ["base+3", "3+4"], ["3+4", "4"]]


def test_an_unknown_protocol_is_named():
    with pytest.raises(DataError, match="incremental protocol 'mixed': expected one of disjoint, overlap"):
        steps_of(frozenset({1}), STEPS, "mixed")


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


def test_tags_become_targets_over_the_steps_own_classes():
    import torch

    tags = torch.tensor([[5, -1, -1], [6, 5, -1], [2, 7, 6]])  # the step's classes are 5 and 6
    assert tag_targets(tags, 5, 2).tolist() == [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
