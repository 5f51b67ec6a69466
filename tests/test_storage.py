import os

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.data.shards import SEGMENTATION_SCHEMA, parquet_files, write_shards
from pipeline.runtime.storage import content_digest, worker_uris

BUCKET = "shards"


def _rows(n: int) -> list[dict]:
    return [{"id": f"s{i}", "height": 1, "width": 1, "image": bytes([i]), "mask": None} for i in range(n)]


@pytest.fixture
def split(tmp_path):
    write_shards(_rows(5), SEGMENTATION_SCHEMA, tmp_path / "labeled", shard_rows=2)
    return tmp_path / "labeled"


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A bucket on the S3 server, and the environment pyarrow's S3 client reads."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    yield client


def test_without_a_data_uri_workers_read_the_local_shards(split):
    assert worker_uris(parquet_files(split), None) == [str(f.resolve()) for f in sorted(split.glob("*.parquet"))]


def test_shards_are_uploaded_once_named_by_content_and_read_back_in_order(split, s3):
    files = parquet_files(split)
    uris = worker_uris(files, f"s3://{BUCKET}/prepared")
    digests = [content_digest(f) for f in files]
    assert uris == [f"s3://{BUCKET}/prepared/{d[:2]}/{d[2:]}.parquet" for d in digests]
    stored = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert len(stored) == 3
    filesystem, _ = pafs.FileSystem.from_uri(uris[0])
    read_back = pq.read_table([u.removeprefix("s3://") for u in uris], filesystem=filesystem)
    assert read_back.column("id").to_pylist() == [f"s{i}" for i in range(5)]
    assert worker_uris(files, f"s3://{BUCKET}/prepared") == uris  # a later stage reuses them
    again = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert again == stored


def test_a_partial_copy_on_a_filesystem_is_written_again(split, tmp_path):
    files = parquet_files(split)
    first = worker_uris(files, str(tmp_path / "store"))
    with open(first[0], "r+b") as f:  # as a copy cut short by a crash would be
        f.truncate(10)
    assert worker_uris(files, str(tmp_path / "store")) == first
    assert os.path.getsize(first[0]) == files[0].stat().st_size
    assert pq.read_table(first).num_rows == 5
