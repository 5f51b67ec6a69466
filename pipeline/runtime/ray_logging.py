"""Logging set-up for Ray worker processes. Kept free of heavy imports: Ray runs it in every
worker process of a stage, data-reading tasks included."""

import logging
import os

VERBOSE = "PIPELINE_VERBOSE"  # 1: keep Ray Train's line per checkpoint and per report


def quiet_worker_logs() -> None:
    """Without a dashboard, Ray Train's placement-group cleaner cannot reach the State API and
    warns about it every second for the whole job; it still does its work, so only its own
    logger is turned down. Ray Data says (at INFO) that it logs one dataset at a time when a
    worker reads its datasets side by side, as ours do. Ray Train says at INFO, in lines of
    hundreds of characters, that each epoch's checkpoint was written and reported: the epoch
    line of the loop says it in one, so those are kept only with PIPELINE_VERBOSE=1."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.getLogger("ray.data._internal.logging").setLevel(logging.WARNING)
    if os.environ.get(VERBOSE) != "1":
        for name in ("ray.train.v2._internal.execution.storage", "ray.train.v2._internal.execution.context"):
            logging.getLogger(name).setLevel(logging.WARNING)
