"""Which Ray a stage's process joins."""

from __future__ import annotations

import os
import sys

from pipeline.config.params import RayConfig
from pipeline.runtime.local_ray import execution_ray_address, local_cpus, start_local_ray
from pipeline.runtime.ray_logging import VERBOSE

# Ray Train's settings for every job of a stage. Ray reads them from the environment: the trainer
# in the driver passes the driver's to its controller, the workers get them through the job's
# runtime env. Environment variables of the same name win.
RAY_TRAIN_ENV = {
    # Workers are polled every 2 s by default, and a stage waits for the poll at every state change.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Prometheus metrics need a dashboard, which we do not start.
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # The print patch logs each print of a worker as well, so it reached the console twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def init_ray(ray_cfg: RayConfig) -> None:
    """Connect to `RAY_ADDRESS` / `ray.address` if given, else to the local Ray of this
    `dvc repro` (`execution_ray_address`), else start one. Call it before importing Ray."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    address = ray_cfg.resolved_address() or execution_ray_address(ray_cfg)
    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    env_vars = {key: os.environ[key] for key in RAY_TRAIN_ENV} | {VERBOSE: os.environ.get(VERBOSE, "0")}
    job_options = {"logging_config": ray.LoggingConfig(log_level="WARNING"),
                   "runtime_env": {"worker_process_setup_hook": "pipeline.runtime.ray_worker.setup_worker_process",
                                   "env_vars": env_vars}}
    if address:
        ray.init(address=address, **job_options)
    else:
        start_local_ray(local_cpus(ray_cfg), **job_options)
