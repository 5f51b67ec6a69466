"""Logging set-up for Ray worker processes. Kept free of heavy imports: Ray runs it in every
worker process of a stage, data-reading tasks included."""

import logging
import os

VERBOSE = "PIPELINE_VERBOSE"  # 1: Ray Train's INFO lines on the console too


def verbose() -> bool:
    return os.environ.get(VERBOSE) == "1"


def quiet_worker_logs() -> None:
    """Without a dashboard, Ray Train's placement-group cleaner cannot reach the State API and
    warns about it every second for the whole job; it still does its work, so only its own
    logger is turned down. Ray Data says (at INFO) that it logs one dataset at a time when a
    worker reads its datasets side by side, as ours do."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.getLogger("ray.data._internal.logging").setLevel(logging.WARNING)
    if not verbose():
        # Each epoch's "Reporting training result …" line, hundreds of characters, comes from a
        # logger named after its file rather than under `ray.train`, so the jobs'
        # `logging_config` (pipeline.train.launch.job_configs) does not reach it.
        import ray

        reporter = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
        logging.getLogger(reporter).setLevel(logging.WARNING)
