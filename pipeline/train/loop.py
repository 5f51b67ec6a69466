"""The worker side of every training stage's Ray Train job: its setup, its shards in memory,
and the one loop all stages use (restore, step, report and checkpoint every epoch from rank 0)."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.config.params import ModelConfig, TrainConfig
from pipeline.runtime.execution import peak_rss_mb

STATE_FILE = "state.pt"


@dataclass
class JobConfig:
    """Everything a stage's job needs, typed: the stage's section and the model for the workers'
    loop, and runtime wiring that must not change the run's name (initial weights; the folder
    rank 0 writes each epoch's metrics to, for the stage to log to its MLflow run:
    `runtime.epoch_log`)."""

    train: TrainConfig
    model: ModelConfig
    num_classes: int
    classes: tuple[str, ...] = ()
    cpus_per_worker: int = 1
    init_state: dict | None = None
    init_from_denoiser: bool = False  # init_state's head predicts noise (DENOISE_CHANNELS), not classes
    epoch_log_uri: str | None = None

    def identity(self) -> dict:
        return {"train": asdict(self.train), "model": asdict(self.model), "num_classes": self.num_classes,
                "init_from_denoiser": self.init_from_denoiser}


def threads_and_seed(job: JobConfig, rank: int) -> torch.Generator:
    """`cpus_per_worker` torch threads, and torch's and the batch sampler's seeds for `rank`:
    one place, so a loop outside Ray (the benchmark's baseline) draws exactly the batches rank 0
    of the Ray job draws."""
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
        return cls(rank, ctx.get_world_size(), ray.train.torch.get_device(), threads_and_seed(job, rank))

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Ray's `prepare_model` (device, and DDP with more than one worker); outside Ray (`in_ray`
    false: the benchmark's baseline), the device."""
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
               job: JobConfig, setup: WorkerSetup) -> None:
    """The loop every training stage shares.

    Each epoch runs `steps_per_epoch` calls of `step` (which returns a dict of scalar loss
    tensors, the first of which is optimised), then reports the epoch's mean losses and a
    checkpoint of the unwrapped model from rank 0, which also writes its metrics for the stage
    to log to MLflow (to `job.epoch_log_uri`).
    Resumes from Ray's latest checkpoint when the job is relaunched.
    """
    train = job.train
    epochs, steps = train.epochs, train.steps_per_epoch
    scheduler = warmup_cosine(optimizer, epochs * steps)
    start_epoch, restored_seconds = restore(model, optimizer, scheduler)
    # A relaunch or a restarted worker group: said in the log, and in the MLflow run with the next epoch's metrics.
    resumed = {"resumed_at_epoch": start_epoch} if start_epoch else {}
    if start_epoch and setup.rank == 0:
        print(f"resumed from the checkpoint of epoch {start_epoch}/{epochs}", flush=True)
    timeline = {"worker_started_at": setup.started_at, "loop_started_at": time.time()}
    loop_seconds = restored_seconds  # in the training steps, over every launch
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        totals = train_steps(model, optimizer, scheduler, step, steps, setup.device)
        epoch_seconds = time.perf_counter() - started
        loop_seconds += epoch_seconds
        metrics = {k: v / steps for k, v in totals.items()}
        metrics |= {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[-1], "loop_seconds": loop_seconds,
                    "world_size": setup.world_size, "data_seconds": setup.data_seconds,
                    "worker_peak_rss_mb": peak_rss_mb()}
        if setup.world_size > 1:
            metrics["replica_weight_spread"] = replica_weight_spread(model)
        metrics |= resumed if epoch == start_epoch else {}
        if setup.rank == 0 and job.epoch_log_uri:
            from pipeline.runtime.epoch_log import write_epoch

            write_epoch(job.epoch_log_uri, metrics)
        if setup.rank == 0:
            print(epoch_line(epoch + 1, epochs, {k: metrics[k] for k in totals}, steps * train.batch_size,
                             epoch_seconds, loop_seconds), flush=True)
        state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "epoch": epoch + 1, "loop_seconds": loop_seconds}
        # Everything since the loop started that was not a training step (checkpoints, the
        # earlier report barriers) is reporting; this epoch's report falls after the mark, and the
        # last one is part of the job's end.
        now = time.time()
        outside_steps = now - timeline["loop_started_at"] - (loop_seconds - restored_seconds)
        marks = timeline | {"loop_ended_at": now, "report_seconds": outside_steps}
        report(metrics | marks, state if setup.rank == 0 else None)


def epoch_line(epoch: int, epochs: int, losses: dict[str, float], images: int, epoch_seconds: float,
               loop_seconds: float) -> str:
    """The stage's progress, one line per epoch: its losses, images per second (all workers
    together) and the time left in the loop at this epoch's pace."""
    left = round((epochs - epoch) * epoch_seconds)
    return (f"epoch {epoch}/{epochs} " + " ".join(f"{k}={v:.4f}" for k, v in losses.items())
            + f" | {images / max(epoch_seconds, 1e-9):.0f} images/s | {loop_seconds:.0f}s in the loop"
            + (f", about {left // 60} min {left % 60:02d} s to go" if epoch < epochs else ""))


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, step: Callable[[], dict],
                steps: int, device: torch.device) -> dict[str, float]:
    """`steps` optimisation steps; returns the sum of each loss over them."""
    from pipeline.models.transunet import (
        mixed_precision,  # not at the top: the driver imports this module without timm
    )

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
