"""The benchmark's baseline: a training stage with its Ray Train job replaced by the very same
recipe, data, threads and number of steps in one plain PyTorch process, no Ray at all.

    python -m pipeline.tools.plain stages/teacher_finetune.py --prepared ... --out ...

runs the stage script as DVC would, except that `pipeline.train.launch.launch` is this module's
`plain_launch`; the stage still reads its params, opens its MLflow run and prints its summary.
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.config.params import RayConfig
from pipeline.data.shards import dataset_files, read_rank_columns
from pipeline.runtime.execution import peak_rss_mb
from pipeline.train.loop import JobConfig, WorkerSetup, threads_and_seed, train_steps, warmup_cosine
from pipeline.train.recipes import Recipe, rows_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.runtime.tracking import StageRun


def plain_setup(job: JobConfig, device: torch.device = torch.device("cpu")) -> WorkerSetup:
    """A single process outside Ray, seeded like rank 0 of the stage's job."""
    return WorkerSetup(0, 1, device, threads_and_seed(job, 0), in_ray=False)


def plain_launch(stage: str, recipe: Recipe, job: JobConfig, ray_cfg: RayConfig, inputs: list[Path],
                 run: StageRun | None = None, while_job_starts: Callable[..., None] | None = None) -> tuple[dict, dict]:
    """What `launch` returns, trained in this process: the state and the final metrics. It stands
    in for `launch`, so it takes the same arguments; `stage`, `ray_cfg`, `inputs` and `run` serve
    the Ray job (its name, cluster, checkpoint keys and epoch logging) and go unused here: no
    epoch's metrics are logged. `while_job_starts` (the stage's run opened, its imports) is done
    first, `wait=True`, as a stage with no job to wait on would."""
    if while_job_starts is not None:
        while_job_starts(wait=True)
    started = time.perf_counter()
    rows = {name: rows_of(rows_type, read_rank_columns([str(f) for f in dataset_files(folders)],
                                                       list(rows_type._fields)))
            for name, (folders, rows_type) in recipe.datasets().items()}
    data_seconds = time.perf_counter() - started
    setup = plain_setup(job)
    parts = recipe.build(job, setup, **rows)
    steps = job.train.epochs * job.train.steps_per_epoch
    started = time.perf_counter()
    totals = train_steps(parts.model, parts.optimizer, warmup_cosine(parts.optimizer, steps), parts.step, steps,
                         setup.device)
    metrics = {key: value / steps for key, value in totals.items()}
    metrics |= {"loop_seconds": time.perf_counter() - started, "data_seconds": data_seconds, "world_size": 1,
                "worker_peak_rss_mb": peak_rss_mb()}
    return {"model": parts.model.state_dict()}, metrics


def main(argv: list[str] | None = None) -> None:
    import argparse

    import pipeline.train.launch

    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.plain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", type=Path, help="a training stage's script, e.g. stages/teacher_finetune.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the stage script's own arguments")
    args = parser.parse_args(argv)
    if not args.script.is_file():
        sys.exit(f"error: {args.script}: no such stage script")
    # The stage imports `launch` when it trains, so the replacement is the one it finds.
    pipeline.train.launch.launch = plain_launch
    sys.argv = [str(args.script), *args.args]
    runpy.run_path(str(args.script), run_name="__main__")


if __name__ == "__main__":
    main()
