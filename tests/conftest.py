import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Ray asks about usage stats on first start; tests never answer prompts.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The longest files first: under `make test`'s two workers, which take whole files in this order
# (`--dist loadfile --no-loadscope-reorder`), each starts on one at once and the short files
# fill the other worker meanwhile.
# test_pipeline_copy_e2e.py reads a copy of test_pipeline_e2e.py's first run, made once that run
# is done: after the other worker's two long files, it has long been.
LONGEST_FIRST = ("test_pipeline_e2e.py", "test_cluster_e2e.py", "test_incremental_e2e.py", "test_pipeline_copy_e2e.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


@pytest.fixture(autouse=True)
def no_exit_watchdog_left_behind():
    """A stage that fails arms a watchdog that ends its process 20 s later (`stage_run.exit_within`);
    a test that ran the stage in pytest's own process carries on, so it is cancelled."""
    import faulthandler

    yield
    faulthandler.cancel_dump_traceback_later()


def session_folder(tmp_path_factory) -> Path:
    """A folder every pytest worker of this session sees: under pytest-xdist each worker's
    temporary root is a subfolder of it."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, every: float = 0.2) -> bool:
    """Whether `condition()` came true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


@dataclass
class S3Server:
    """A real S3-compatible server on loopback (moto's, over HTTP) and how to reach it."""

    url: str

    @property
    def env(self) -> dict:
        """What points every S3 client (pyarrow for Ray, boto3 for MLflow and DVC) at the server."""
        return {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.url}

    def client(self):
        import boto3

        env = self.env
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield S3Server(f"http://127.0.0.1:{port}")
    server.stop()


# A CLIP small enough to save in a test, as open_clip builds it from a config.
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
DINO = "vit_small_patch16_224.dino"


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """(an open_clip `local-dir:` folder, the layout of an `hf-hub:` repository, of a tiny
    seeded CLIP; the model it holds)."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    folder = tmp_path_factory.mktemp("clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder, model


@pytest.fixture(scope="session")
def dino_file(tmp_path_factory):
    """(a weights file of timm's DINO ViT-S/16, seeded, not trained; the model it holds)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(DINO, pretrained=False).eval()
    path = tmp_path_factory.mktemp("dino") / "dino.safetensors"
    save_file(model.state_dict(), str(path))
    return path, model
