"""Run a command (usually `dvc repro`) against one local Ray instance shared by all its stages.

    python -m pipeline.cluster -- dvc repro

Without it every training stage starts and stops its own local Ray; with it they connect to
one started here, which saves each stage Ray's start-up. The instance lives exactly as long
as the command: it stops when the command ends, fails or is interrupted. When `RAY_ADDRESS`
is already set (a real cluster), the command simply runs against that.
"""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.config import PARAMS_FILE, ConfigError, load_params


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    if not command:
        sys.exit("usage: python -m pipeline.cluster -- COMMAND [ARGS...]")
    if os.environ.get("RAY_ADDRESS"):
        return subprocess.call(command)
    try:
        ray_cfg = load_params(PARAMS_FILE).ray if os.path.exists(PARAMS_FILE) else None
    except ConfigError as err:
        sys.exit(f"error: {err}")
    if ray_cfg is not None and ray_cfg.address:
        return subprocess.call(command)

    import ray

    from pipeline.raytrain import local_ray_options

    context = ray.init(**local_ray_options(ray_cfg), log_to_driver=False)
    env = {**os.environ, "RAY_ADDRESS": context.address_info["gcs_address"]}
    try:
        return subprocess.call(command, env=env)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
