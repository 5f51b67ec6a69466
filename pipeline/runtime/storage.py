"""Where Ray workers read the prepared Parquet shards from.

The shards are DVC outputs in the project folder (DVC versions and caches them; DVC 3 no
longer caches outputs that live at remote URIs). Workers on the same machine, or on nodes
that mount that folder at the same path, read them there. With `ray.data_uri` set (e.g.
`s3://bucket/shards`, or any URI pyarrow knows), each shard is copied once into that store,
named by its content, and every worker reads it from there instead: a cluster needs no
shared filesystem, and a shard already uploaded by an earlier stage or run is reused.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

CHUNK = 1 << 20


def content_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def make_folder(filesystem, folder: str) -> None:
    """Make `folder` on a pyarrow filesystem where folders exist: object stores have none (a
    file's name holds its path), and would get marker objects."""
    import pyarrow.fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem):
        filesystem.create_dir(folder, recursive=True)


def worker_uris(files: list[Path], data_uri: str | None) -> list[str]:
    """The paths Ray workers read `files` from, in the same order: absolute local paths, or,
    with `data_uri`, `<data_uri>/<sha256[:2]>/<sha256[2:]>.parquet` copies, uploaded when
    missing (an object store's upload appears whole or not at all; a partial copy on a
    filesystem is caught by its size and written again)."""
    if not data_uri:
        return [str(f.resolve()) for f in files]
    import pyarrow.fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(data_uri)
    scheme = data_uri.split("://", 1)[0] + "://" if "://" in data_uri else ""
    uris, uploaded = [], 0
    for file in files:
        digest = content_digest(file)
        folder = f"{root.rstrip('/')}/{digest[:2]}"
        target = f"{folder}/{digest[2:]}.parquet"
        stored = filesystem.get_file_info(target)
        if stored.type == pafs.FileType.NotFound or stored.size != file.stat().st_size:
            make_folder(filesystem, folder)
            pafs.copy_files(str(file.resolve()), target, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=filesystem)
            uploaded += 1
        uris.append(scheme + target)
    print(f"{len(uris)} Parquet shards read from {data_uri} ({uploaded} uploaded now)", file=sys.stderr, flush=True)
    return uris
