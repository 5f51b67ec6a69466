import numpy as np
import pytest

from pipeline.data.png import decode_png, encode_png
from pipeline.data.shards import (
    SEGMENTATION_SCHEMA,
    TAGGED_SCHEMA,
    DataError,
    check_rows,
    read_rank_columns,
    read_split,
    write_shards,
)


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


def test_each_rank_reads_its_contiguous_share_and_the_shares_hold_every_row_once(tmp_path):
    rows = [{"id": f"x{i}", "height": 2, "width": 2, "image": encode_png(np.full((2, 2, 3), i, np.uint8)),
             "mask": encode_png(np.full((2, 2), i, np.uint8))} for i in range(11)]
    write_shards(rows, SEGMENTATION_SCHEMA, tmp_path / "split", shard_rows=4)
    write_shards([], SEGMENTATION_SCHEMA, tmp_path / "empty", shard_rows=4)  # a part with no rows
    uris = [str(f) for f in sorted((tmp_path / "split").glob("*.parquet"))] + [str(tmp_path / "empty/part-00000.parquet")]
    for world_size in (1, 2, 3):
        shares = [read_rank_columns(uris, ["image", "mask"], rank, world_size) for rank in range(world_size)]
        assert [len(share["mask"]) for share in shares] in ([11], [5, 6], [3, 4, 4])
        values = [int(v) for share in shares for v in share["mask"][:, 0, 0]]
        assert values == list(range(11))  # file order, each row once
        assert all(share["image"].shape[1:] == (3, 2, 2) for share in shares)
    assert read_rank_columns([(tmp_path / "split/part-00001.parquet").as_uri()], ["mask"])["mask"].shape == (4, 2, 2)


def test_an_incremental_steps_tags_are_read_as_rows_padded_with_minus_one(tmp_path):
    image = encode_png(np.zeros((4, 4, 3), np.uint8))
    rows = [{"id": eid, "height": 4, "width": 4, "image": image, "mask": None, "tags": tags}
            for eid, tags in (("a", [5]), ("b", [5, 6]))]
    write_shards(rows, TAGGED_SCHEMA, tmp_path, 10)
    columns = read_rank_columns([str(f) for f in sorted(tmp_path.glob("*.parquet"))], ["image", "tags"])
    assert columns["image"].shape == (2, 3, 4, 4) and columns["tags"].tolist() == [[5, -1], [5, 6]]
