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

# On a Ray this pipeline starts itself, on one machine, no node can be preempted: Ray Train's
# preemption watcher would only be one more actor process per stage (~1.2 s of CPU to start,
# while the worker imports torch) and a poller beside the training loop. A cluster keeps it.
# A stage's driver passes them on to Ray Train's controller and workers.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def local_cpus(ray_cfg: RayConfig | None) -> int:
    """Logical CPUs for a local Ray: the machine's, or what the training workers or the
    inference actors ask for, plus one. Both hold their CPUs for the whole job and Ray Data's
    read tasks need one more, or they wait forever."""
    held = max(ray_cfg.num_workers, ray_cfg.inference_actors) * ray_cfg.cpus_per_worker if ray_cfg else 1
    return max(os.cpu_count() or 1, held) + 1


def local_ray_options(ray_cfg: RayConfig | None) -> dict:
    """`ray.init` arguments that start a new local Ray (never attach to one already running
    on the machine, whose resources we do not know)."""
    return {"address": "local", "num_cpus": local_cpus(ray_cfg), "include_dashboard": False}


def start_local_ray(ray_cfg: RayConfig | None, **init_options):
    """Start a new local Ray, with this process's environment (and so its stages') given the
    Ray Train settings for one machine, values already set winning; returns `ray.init`'s context."""
    import ray

    for key, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    return ray.init(**local_ray_options(ray_cfg), **init_options)


@contextmanager
def shared_ray(ray_cfg: RayConfig | None) -> Iterator[dict]:
    """The environment for child processes that should all use one Ray: the running cluster's
    when one is named, else a local instance started here and stopped on exit."""
    if os.environ.get("RAY_ADDRESS") or (ray_cfg is not None and ray_cfg.address):
        yield dict(os.environ)
        return
    import ray

    context = start_local_ray(ray_cfg, log_to_driver=False)
    try:
        yield {**os.environ, "RAY_ADDRESS": context.address_info["gcs_address"]}
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
