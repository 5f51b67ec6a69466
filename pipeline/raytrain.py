"""Ray Train plumbing shared by every training stage.

Driver side: `launch` builds the ScalingConfig / RunConfig and Ray Data datasets, runs the
`TorchTrainer` and returns the final checkpoint's state. Worker side: `WorkerSetup` (threads,
seeds, device, MLflow), `load_images` / `load_segmentation` (the worker's Ray Data shard as
in-memory tensors) and `run_epochs` (the one loop all stages use: restore, step, report and
checkpoint every epoch from rank 0).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.cluster import execution_ray_address, local_cpus, start_local_ray
from pipeline.config import ModelConfig, RayConfig, TrainConfig
from pipeline.data import columns_to_tensors, parquet_files
from pipeline.stage import peak_rss_mb
from pipeline.storage import worker_uris

STATE_FILE = "state.pt"

# Ray Train V2 polls its workers every 2 s and exports Prometheus metrics by default; a stage
# waits for the poll at every state change, and the metrics need a dashboard we do not start.
# Environment variables of the same name win.
_TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_METRICS_ENABLED": "0"}


# --------------------------------------------------------------------------- driver side

def run_name(stage: str, loop_config: dict, inputs: list[Path]) -> str:
    """A name that is stable for the same config and inputs, so relaunching a failed stage
    resumes its checkpoints, and different inputs never resume a stale run."""
    digest = hashlib.sha256(json.dumps(loop_config, sort_keys=True, default=str).encode())
    for root in inputs:
        for path in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{stage}-{digest.hexdigest()[:12]}"


def init_ray(ray_cfg: RayConfig) -> None:
    """Connect to `RAY_ADDRESS` / `ray.address` if given, else to the local Ray of this
    `dvc repro` (`execution_ray_address`), else start one. Call it before importing Ray."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    address = ray_cfg.resolved_address() or execution_ray_address(ray_cfg)
    import ray

    job_options = {"logging_config": ray.LoggingConfig(log_level="WARNING"),
                   "runtime_env": {"worker_process_setup_hook": "pipeline.ray_logging.quiet_worker_logs"}}
    if address:
        ray.init(address=address, **job_options)
    else:
        start_local_ray(local_cpus(ray_cfg), **job_options)


def connect(ray_cfg: RayConfig) -> None:
    """Ray Train's settings for a stage's job, then Ray (`init_ray`)."""
    for key, value in _TRAIN_ENV_DEFAULTS.items():  # the trainer reads them and passes them to its controller
        os.environ.setdefault(key, value)
    init_ray(ray_cfg)


def job_configs(ray_cfg: RayConfig, name: str) -> dict:
    """The `TorchTrainer` arguments every training stage's job shares: its workers, and its run
    `name` under `ray.storage_path` (the latest checkpoint kept, relaunched on failures)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    storage = ray_cfg.storage_path if "://" in ray_cfg.storage_path else str(Path(ray_cfg.storage_path).resolve())
    return {"scaling_config": ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                                            resources_per_worker={"CPU": ray_cfg.cpus_per_worker}),
            "run_config": RunConfig(name=name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=1),
                                    failure_config=FailureConfig(max_failures=ray_cfg.max_failures))}


@dataclass
class JobConfig:
    """Everything a worker loop needs, typed: the stage's section, the model, and runtime
    wiring that must not change the run's name (MLflow run, initial weights)."""

    train: TrainConfig
    model: ModelConfig
    num_classes: int
    classes: tuple[str, ...] = ()
    cpus_per_worker: int = 1
    init_state: dict | None = None
    init_from_denoiser: bool = False  # init_state's head predicts noise (DENOISE_CHANNELS), not classes
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None

    def identity(self) -> dict:
        return {"train": asdict(self.train), "model": asdict(self.model), "num_classes": self.num_classes,
                "init_from_denoiser": self.init_from_denoiser}


def launch(stage: str, builder: str, job: JobConfig, datasets: dict[str, tuple[list[Path], list[str]]],
           ray_cfg: RayConfig, inputs: list[Path]) -> tuple[dict, dict]:
    """Train `training.BUILDERS[builder]` as a Ray Train job; return (final state dict, final
    reported metrics).

    `datasets` maps a name to (Parquet folders, columns), read with Ray Data and sharded
    across workers. Checkpoints live under `ray.storage_path` while the job runs and are
    removed once the final state is back, since the stage exports it as its DVC output.
    The builder goes by name so that the driver never imports the models (timm and
    torchvision cost seconds per stage); only the workers do.
    """
    connect(ray_cfg)
    import ray.data
    from ray.train import DataConfig
    from ray.train.torch import TorchTrainer

    ray_connected_at = time.time()
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    # Ray Data's V2 Parquet reader lists files in a task and provisions footer-reader actors:
    # ~10 s per training stage on a small node, for shards that are a few MB. V1 reads them directly.
    data_context.use_datasource_v2 = False
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"job": job, "builder": builder, "datasets": list(datasets)},
        **job_configs(ray_cfg, run_name(stage, job.identity(), inputs)),
        datasets={key: ray.data.read_parquet(worker_uris([f for p in paths for f in parquet_files(Path(p))],
                                                         ray_cfg.data_uri), columns=columns)
                  for key, (paths, columns) in datasets.items()},
        # One worker reads the whole dataset: splitting it would only add a coordinator actor (~3 s).
        dataset_config=DataConfig(datasets_to_split="all" if ray_cfg.num_workers > 1 else []),
    )
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


# --------------------------------------------------------------------------- worker side

def _train_worker(config: dict) -> None:
    """Load this worker's shards while the models' imports (seconds of timm and torchvision) run
    on this thread: each dataset in a thread of its own, since most of a small dataset's load is
    Ray Data starting its execution, and the read tasks run in other processes."""
    from concurrent.futures import ThreadPoolExecutor

    started_at = time.time()
    with ThreadPoolExecutor(len(config["datasets"])) as pool:
        loading = {name: pool.submit(load_shard, name) for name in config["datasets"]}
        from pipeline.training import train_worker

        data = {name: future.result() for name, future in loading.items()}
    train_worker(config["builder"], config["job"], data, started_at, time.time() - started_at)


def _threads_and_seed(job: JobConfig, rank: int) -> torch.Generator:
    """`cpus_per_worker` torch threads, and torch's and the batch sampler's seeds for `rank`:
    one place, so the plain baseline draws exactly the batches rank 0 of the Ray job draws."""
    torch.set_num_threads(job.cpus_per_worker)
    torch.manual_seed(job.train.seed * 1000 + rank)
    return torch.Generator().manual_seed(job.train.seed * 1000 + rank)


@dataclass
class WorkerSetup:
    """What a worker needs to know about itself; built once at the top of a train loop."""

    rank: int
    world_size: int
    device: torch.device
    generator: torch.Generator
    mlflow_run_id: str | None
    tracking_uri: str | None
    in_ray: bool = True
    data_seconds: float = 0.0  # loading this worker's shards into memory
    started_at: float = 0.0  # wall clock when this worker's train function was entered

    @classmethod
    def from_job(cls, job: JobConfig) -> WorkerSetup:
        import ray
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        rank = ctx.get_world_rank()
        # Where each worker runs, for people (and tests) checking placement or killing one.
        print(f"worker {rank}/{ctx.get_world_size()} pid {os.getpid()} on node {ray.get_runtime_context().get_node_id()}",
              flush=True)
        return cls(rank, ctx.get_world_size(), ray.train.torch.get_device(), _threads_and_seed(job, rank),
                   job.mlflow_run_id, job.tracking_uri)

    @classmethod
    def plain(cls, job: JobConfig) -> WorkerSetup:
        """A single process outside Ray (the benchmark's baseline), seeded like rank 0."""
        return cls(0, 1, torch.device("cpu"), _threads_and_seed(job, 0), None, None, in_ray=False)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Ray's `prepare_model` (device, and DDP with more than one worker); outside Ray, the device."""
        if self.device.type == "cuda":
            # Every step has the same shapes: cuDNN times its algorithms once per shape and keeps the fastest.
            torch.backends.cudnn.benchmark = True
        if not self.in_ray:
            return model.to(self.device)
        from ray.train.torch import prepare_model

        return prepare_model(model)

    def per_worker(self, global_batch: int) -> int:
        """Stage params give global batch sizes; each worker takes its share."""
        return max(1, global_batch // self.world_size)

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.rank != 0 or not self.mlflow_run_id:
            return
        from pipeline.tracking import log_metrics

        log_metrics(self.tracking_uri, self.mlflow_run_id, metrics, step)


def load_shard(name: str) -> dict[str, torch.Tensor]:
    """This worker's Ray Data shard of dataset `name`, decoded into in-memory tensors.

    Shards of prepared data are small enough to hold (uint8), and sampling batches from
    memory keeps the per-step cost at the model's, not the loader's.
    """
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    return columns_to_tensors(shard.iter_batches(batch_size=256, batch_format="numpy"))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05):
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def run_epochs(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], dict],
               train: TrainConfig, setup: WorkerSetup) -> None:
    """The loop every training stage shares.

    Each epoch runs `steps_per_epoch` calls of `step` (which returns a dict of scalar loss
    tensors, the first of which is optimised), then reports the epoch's mean losses and a
    checkpoint of the unwrapped model from rank 0. Resumes from Ray's latest checkpoint when the job is relaunched.
    """
    epochs, steps = train.epochs, train.steps_per_epoch
    scheduler = warmup_cosine(optimizer, epochs * steps)
    start_epoch, restored_seconds = restore(model, optimizer, scheduler)
    if start_epoch:  # a relaunch or a restarted worker group: visible in the log and the MLflow run
        setup.log_metrics({"resumed_at_epoch": start_epoch}, start_epoch)
        if setup.rank == 0:
            print(f"resumed from the checkpoint of epoch {start_epoch}/{epochs}", flush=True)
    timeline = {"worker_started_at": setup.started_at, "loop_started_at": time.time()}
    loop_seconds = restored_seconds  # in the training steps, over every launch
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        totals = train_steps(model, optimizer, scheduler, step, steps, setup.device)
        loop_seconds += time.perf_counter() - started
        metrics = {k: v / steps for k, v in totals.items()}
        metrics |= {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[-1], "loop_seconds": loop_seconds,
                    "world_size": setup.world_size, "data_seconds": setup.data_seconds,
                    "worker_peak_rss_mb": peak_rss_mb()}
        if setup.world_size > 1:
            metrics["replica_weight_spread"] = replica_weight_spread(model)
        setup.log_metrics(metrics, epoch + 1)
        if setup.rank == 0:
            losses = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in totals)
            print(f"epoch {epoch + 1}/{epochs} {losses} ({loop_seconds:.0f}s in the loop)", flush=True)
        state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch + 1, "loop_seconds": loop_seconds}
        # Everything since the loop started that was not a training step (logging, checkpoints, the
        # earlier report barriers) is reporting; this epoch's report falls after the mark, and the
        # last one is part of the job's end.
        now = time.time()
        outside_steps = now - timeline["loop_started_at"] - (loop_seconds - restored_seconds)
        marks = timeline | {"loop_ended_at": now, "report_seconds": outside_steps}
        report(metrics | marks, state if setup.rank == 0 else None)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: Callable[[], dict],
                steps: int, device: torch.device) -> dict[str, float]:
    """`steps` optimisation steps; returns the sum of each loss over them."""
    from pipeline.models import mixed_precision  # not at the top: the driver imports this module without timm

    model.train()
    totals: dict[str, torch.Tensor] = {}
    for _ in range(steps):
        with mixed_precision(device):
            losses = step()
        optimizer.zero_grad(set_to_none=True)
        next(iter(losses.values())).backward()
        optimizer.step()
        scheduler.step()
        # Summed where they are and read once: reading a GPU value each step would make the
        # host wait for the step to finish before it queues the next.
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + value.detach().double()
    return {key: float(total) for key, total in totals.items()}


def replica_weight_spread(model: torch.nn.Module) -> float:
    """How far apart the workers' copies of the weights are (0 when DDP keeps them in step):
    the largest difference between ranks of a float64 checksum of every parameter."""
    import torch.distributed as dist

    checksum = torch.stack([p.detach().double().sum() for p in unwrap(model).parameters()]).sum()
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)  # on the parameters' device: NCCL gathers GPU tensors only
    spread = torch.stack(gathered)
    return float(spread.max() - spread.min())


def restore(model, optimizer, scheduler) -> tuple[int, float]:
    """Load Ray's latest checkpoint, if the job is a relaunch; return (start epoch, seconds so far)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0.0
    with checkpoint.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), float(state["loop_seconds"])


def report(metrics: dict, state: dict | None) -> None:
    """`ray.train.report` is a barrier: every rank calls it; only rank 0 passes a checkpoint."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
