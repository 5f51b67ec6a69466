"""What Ray prints on a stage's console: set up in every Ray worker process of a stage (kept
free of heavy imports for that) and in a batch-inference stage's driver."""

import logging
import os

VERBOSE = "PIPELINE_VERBOSE"  # 1: Ray Train's INFO lines on the console too


def verbose() -> bool:
    return os.environ.get(VERBOSE) == "1"


def quiet_worker_logs() -> None:
    """Without a dashboard, Ray Train's placement-group cleaner cannot reach the State API and
    warns about it every second for the whole job; only its own logger is turned down. (It then
    never learns that a training controller died, to free its CPUs: the local Ray ends with its
    `dvc repro`, and a long-lived cluster runs a dashboard.)"""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    if not verbose():
        # Each epoch's "Reporting training result …" line, hundreds of characters, comes from a
        # logger named after its file rather than under `ray.train`, so the jobs'
        # `logging_config` (pipeline.train.launch.job_configs) does not reach it.
        import ray

        reporter = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
        logging.getLogger(reporter).setLevel(logging.WARNING)


def quiet_ray_data_console() -> None:
    """Ray Data prints each dataset's plan, start and end at INFO, and warns once that its
    progress bars are off (the stage draws its own, one per split); unless PIPELINE_VERBOSE=1,
    only its warnings reach the console, and its file in the Ray session (`logs/ray-data/`)
    keeps everything else. Call it after `import ray.data`, which sets up Ray Data's logging."""
    if verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
