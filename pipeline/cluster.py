"""Run a command (usually `dvc repro`) against one local Ray instance shared by all its stages.

    python -m pipeline.cluster -- python -m pipeline.study

Without it every training stage starts and stops its own local Ray; with it they connect to
one started here, which saves each stage Ray's start-up. The instance lives exactly as long
as the command: it stops when the command ends, fails or is interrupted. When `RAY_ADDRESS`
(or `ray.address`) names a cluster already, the command simply runs against that.
`python -m pipeline.run` (what `make run` does) uses the same instance for `dvc repro`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.config import PARAMS_FILE, RayConfig, load_params


@contextmanager
def shared_ray(ray_cfg: RayConfig | None) -> Iterator[dict]:
    """The environment for child processes that should all use one Ray: the running cluster's
    when one is named, else a local instance started here and stopped on exit."""
    if os.environ.get("RAY_ADDRESS") or (ray_cfg is not None and ray_cfg.address):
        yield dict(os.environ)
        return
    import ray

    from pipeline.raytrain import LOCAL_TRAIN_ENV, local_ray_options

    context = ray.init(**local_ray_options(ray_cfg), log_to_driver=False)
    try:
        yield {**LOCAL_TRAIN_ENV, **os.environ, "RAY_ADDRESS": context.address_info["gcs_address"]}
    finally:
        ray.shutdown()


def params_ray_config() -> RayConfig | None:
    """`params.yaml`'s ray section when the file exists (raises ConfigError when invalid)."""
    return load_params(PARAMS_FILE).ray if os.path.exists(PARAMS_FILE) else None


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    if not command or command[0] in ("-h", "--help"):
        print(f"usage: python -m pipeline.cluster -- COMMAND [ARGS...]\n{__doc__}")
        return 0 if command else 2
    try:
        ray_cfg = params_ray_config()
    except ConfigError as err:
        sys.exit(f"error: {err}")
    with shared_ray(ray_cfg) as env:
        return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
