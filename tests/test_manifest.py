import pytest

from pipeline.data.manifest import nested_labeled_ids
from pipeline.data.shards import DataError


def test_labeled_subsets_are_nested():
    ids = [f"train-{i:04d}" for i in range(500)]
    subsets = [set(nested_labeled_ids(ids, f, seed=3)) for f in (0.01, 0.02, 0.05, 0.1, 1.0)]
    assert [len(s) for s in subsets] == [5, 10, 25, 50, 500]
    assert all(small <= large for small, large in zip(subsets, subsets[1:]))
    assert set(nested_labeled_ids(ids, 0.05, seed=4)) != subsets[2]


def test_fraction_that_selects_nothing_is_an_error():
    with pytest.raises(DataError, match="labeled_fraction"):
        nested_labeled_ids(["a", "b"], 1e-6, seed=0)
