"""A training stage's Ray Train job: launched from the stage's process (`launch`: its name,
workers, shards, run), entered on each worker (`worker_entry`: its share of the recipe's shards
and parts, then `loop.run_epochs`)."""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.config.params import RayConfig
from pipeline.data.shards import dataset_files, read_rank_columns
from pipeline.runtime.ray_logging import verbose
from pipeline.runtime.ray_session import init_ray
from pipeline.runtime.storage import worker_uris
from pipeline.train.loop import STATE_FILE, JobConfig, WorkerSetup, run_epochs
from pipeline.train.recipes import Recipe, rows_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.runtime.tracking import StageRun


def run_name(stage: str, loop_config: dict, inputs: list[Path]) -> str:
    """A name that is stable for the same config and inputs, so relaunching a failed stage
    resumes its checkpoints, and different inputs never resume a stale run."""
    digest = hashlib.sha256(json.dumps(loop_config, sort_keys=True, default=str).encode())
    for root in inputs:
        for path in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{stage}-{digest.hexdigest()[:12]}"


def run_storage(ray_cfg: RayConfig) -> str:
    """`ray.storage_path` as Ray Train takes it: a URI, or an absolute local path."""
    return ray_cfg.storage_path if "://" in ray_cfg.storage_path else str(Path(ray_cfg.storage_path).resolve())


def job_configs(ray_cfg: RayConfig, name: str, storage: str) -> dict:
    """The `TorchTrainer` arguments every training stage's job shares: its workers, and its run
    `name` under `storage` (`run_storage`: the latest checkpoint kept, relaunched on failures).
    Ray Train's INFO lines (each epoch's checkpoint written and result reported, hundreds of
    characters each; the loop's epoch line says it in one) reach the console only with
    PIPELINE_VERBOSE=1; its system log file in the Ray session keeps them always."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    return {"scaling_config": ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                                            resources_per_worker={"CPU": ray_cfg.cpus_per_worker}),
            "run_config": RunConfig(name=name, storage_path=storage,
                                    checkpoint_config=CheckpointConfig(num_to_keep=1),
                                    failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                                    logging_config=LoggingConfig("INFO" if verbose() else "WARNING"))}


def launch(stage: str, recipe: Recipe, job: JobConfig, ray_cfg: RayConfig, inputs: list[Path],
           run: StageRun | None = None, while_job_starts: Callable[..., None] | None = None) -> tuple[dict, dict]:
    """Train `recipe` as a Ray Train job; return (final state dict, final reported metrics).

    Each worker reads its share of the recipe's Parquet shards itself (`worker_entry`).
    Checkpoints live under `ray.storage_path` while the job runs and are removed once the final
    state is back, since the stage exports it as its DVC output; so do the epochs' metrics that
    rank 0 writes there and this process logs to the stage's MLflow `run` (`runtime.epoch_log`).
    `while_job_starts` (the stage's: its run opened, what it needs after the job imported, on
    threads) is called right before the job blocks; a replacement of `launch` with no job to
    wait on calls it with `wait=True`, as `pipeline.tools.plain` does. The driver never imports the models for the job
    (timm and torchvision cost seconds per stage); only the workers do, in `recipe.build`.
    """
    init_ray(ray_cfg)
    from ray.train.torch import TorchTrainer

    from pipeline.runtime.epoch_log import EpochLogTail

    ray_connected_at = time.time()
    shards = {name: worker_uris(dataset_files(folders), ray_cfg.data_uri)
              for name, (folders, _) in recipe.datasets().items()}
    name, storage = run_name(stage, job.identity(), inputs), run_storage(ray_cfg)
    job = replace(job, epoch_log_uri=f"{storage.rstrip('/')}/{name}/epochs" if run else None)
    trainer = TorchTrainer(worker_entry, train_loop_config={"job": job, "recipe": recipe, "shards": shards},
                           **job_configs(ray_cfg, name, storage))
    if while_job_starts is not None:
        while_job_starts()
    with EpochLogTail(job.epoch_log_uri, run) if run else nullcontext():
        result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    result.filesystem.delete_dir(result.path)
    return state, {**(result.metrics or {}), "ray_connected_at": ray_connected_at}


def job_phases(launched_at: float, metrics: dict, returned_at: float) -> dict[str, float]:
    """Where a Ray Train job's seconds outside the training loop go, from the wall-clock marks
    of the driver (`launch` called, Ray connected, result back) and of rank 0 (its function
    entered, first epoch started, last report done; the same clock on one machine). Empty when
    the job trained nothing itself (relaunched after its last epoch's checkpoint): its marks,
    if any, are an earlier launch's."""
    if metrics.get("worker_started_at", 0.0) < launched_at:
        return {}
    return {"ray_connect_s": metrics["ray_connected_at"] - launched_at,
            "job_start_s": metrics["worker_started_at"] - metrics["ray_connected_at"],
            "worker_setup_s": metrics["loop_started_at"] - metrics["worker_started_at"],
            "report_s": metrics["report_seconds"],
            "job_end_s": returned_at - metrics["loop_ended_at"]}


def worker_entry(config: dict) -> None:
    """A worker of the job: its share of each dataset's rows, read with pyarrow (every split
    here fits in a worker's memory, and sampling batches from memory keeps a step's cost at the
    model's; Ray Data would add seconds of execution start-up per dataset), each dataset in a
    thread of its own while the recipes' imports (seconds of timm and torchvision) run on this
    one; then the recipe's parts through the epochs."""
    from concurrent.futures import ThreadPoolExecutor

    started_at = time.time()
    job: JobConfig = config["job"]
    recipe: Recipe = config["recipe"]
    setup = WorkerSetup.from_job(job)
    datasets = recipe.datasets()
    with ThreadPoolExecutor(len(datasets)) as pool:
        loading = {name: pool.submit(read_rank_columns, config["shards"][name], list(rows._fields), setup.rank,
                                     setup.world_size) for name, (_, rows) in datasets.items()}
        import pipeline.models.transunet  # noqa: F401
        import pipeline.train.steps  # noqa: F401

        columns = {name: rows_of(datasets[name][1], future.result()) for name, future in loading.items()}
    setup.started_at, setup.data_seconds = started_at, time.time() - started_at
    parts = recipe.build(job, setup, **columns)
    run_epochs(parts.model, parts.optimizer, parts.step, job, setup)
