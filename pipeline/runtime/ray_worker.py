"""What every Ray worker process of a stage's job sets up first (its `worker_process_setup_hook`;
kept free of heavy imports, as it runs in each)."""

import os

from pipeline.runtime.ray_logging import quiet_worker_logs


def setup_worker_process() -> None:
    quiet_worker_logs()
    pin_ray_address()


def pin_ray_address() -> None:
    """`RAY_ADDRESS` set to the Ray this process belongs to, unless it is set. Ray Train's
    placement-group cleaner, an actor of every training job, asks the State API about the job
    from a thread; with no address, that API looks for a Ray on the machine, and where it finds
    two (a user's own beside the stage's) the thread dies with a traceback on the console."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
