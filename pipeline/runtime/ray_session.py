"""Which Ray a stage's process joins."""

from __future__ import annotations

import os
import sys

from pipeline.config.params import RayConfig
from pipeline.runtime.local_ray import execution_ray_address, local_cpus, start_local_ray


def init_ray(ray_cfg: RayConfig) -> None:
    """Connect to `RAY_ADDRESS` / `ray.address` if given, else to the local Ray of this
    `dvc repro` (`execution_ray_address`), else start one. Call it before importing Ray."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    address = ray_cfg.resolved_address() or execution_ray_address(ray_cfg)
    import ray

    job_options = {"logging_config": ray.LoggingConfig(log_level="WARNING"),
                   "runtime_env": {"worker_process_setup_hook": "pipeline.runtime.ray_logging.quiet_worker_logs",
                                   # Ray Train's print patch also logs each print of a worker, which reaches
                                   # the console a second time.
                                   "env_vars": {"PIPELINE_VERBOSE": os.environ.get("PIPELINE_VERBOSE", "0"),
                                                "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}}
    if address:
        ray.init(address=address, **job_options)
    else:
        start_local_ray(local_cpus(ray_cfg), **job_options)
