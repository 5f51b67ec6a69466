import numpy as np
import pytest

from pipeline.data.png import decode_png, encode_png
from pipeline.data.shards import SEGMENTATION_SCHEMA, DataError, check_rows, read_split, write_shards


def test_parquet_shards_round_trip(tmp_path):
    rows = [{"id": f"x{i}", "height": 4, "width": 4, "image": encode_png(np.full((4, 4, 3), i, np.uint8)),
             "mask": None if i % 2 else encode_png(np.full((4, 4), i, np.uint8))} for i in range(7)]
    assert write_shards(rows, SEGMENTATION_SCHEMA, tmp_path / "split", shard_rows=3) == 7
    assert len(list((tmp_path / "split").glob("*.parquet"))) == 3
    table = read_split(tmp_path / "split")
    assert table.schema == SEGMENTATION_SCHEMA
    assert table.column("id").to_pylist() == [f"x{i}" for i in range(7)]
    assert decode_png(table.column("image")[5].as_py())[0, 0, 0] == 5
    assert table.column("mask")[1].as_py() is None


def test_each_ray_worker_needs_a_row(tmp_path):
    rows = [{"id": "a", "height": 1, "width": 1, "image": b"", "mask": None}]
    write_shards(rows, SEGMENTATION_SCHEMA, tmp_path / "one", shard_rows=10)
    assert check_rows("labeled", [tmp_path / "one"], 1) == 1
    with pytest.raises(DataError, match="1 rows, fewer than the 2 Ray workers"):
        check_rows("labeled", [tmp_path / "one"], 2)
