"""What a training stage does around its Ray Train job: checks its data, launches it, writes its
curves and summary, and scores the weights on val when asked."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from pipeline.orchestrate.stage_run import StageContext
from pipeline.train.loop import JobConfig
from pipeline.train.recipes import Recipe


def train(ctx: StageContext, recipe: Recipe, job: JobConfig, inputs: list[Path],
          imports: tuple[str, ...] = ()) -> dict:
    """Train `recipe` as the stage's Ray Train job, its MLflow run opened and `imports` (what the
    stage needs after it) imported while the job starts (`ctx.while_job_starts`); return the
    final state dict."""
    from pipeline.data.shards import check_rows
    # Imported here, not at the top: the benchmark's baseline (`pipeline.tools.plain`) replaces `launch`.
    from pipeline.train.launch import job_phases, launch

    for name, (folders, _) in recipe.datasets().items():
        check_rows(name, list(folders), ctx.params.ray.num_workers)
    job.cpus_per_worker = ctx.params.ray.cpus_per_worker
    launched_at = time.time()
    ctx.summary["startup_s"] = launched_at - ctx.started_at
    state, metrics = launch(ctx.name, recipe, job, ctx.params.ray, inputs, ctx.run,
                            partial(ctx.while_job_starts, *imports))
    ctx.trained_at = time.time()
    ctx.summary |= job_phases(launched_at, metrics, ctx.trained_at)
    run_id = ctx.active_run_id()  # the stage's own `mlflow.log_*` calls log to it from here
    if ctx.curves is not None:
        from pipeline.data.atomic import write_text_atomic
        from pipeline.runtime.tracking import metric_history_csv

        write_text_atomic(ctx.curves, metric_history_csv(ctx.run.tracking_uri, run_id))
    ctx.summary["loss"] = float(metrics.get("loss", float("nan")))
    ctx.summary["loop_s"] = float(metrics.get("loop_seconds", 0.0))
    ctx.summary["world_size"] = int(metrics.get("world_size", 1))
    ctx.summary["data_s"] = float(metrics.get("data_seconds", 0.0))
    ctx.summary["worker_peak_rss_mb"] = float(metrics.get("worker_peak_rss_mb", 0.0))
    return state


def write_val_metrics(ctx: StageContext, state: dict, prepared: Path, path: Path, *, split: str = "val",
                      classes: list[str] | None = None, later_as_background: bool = False,
                      groups: dict[str, list[str]] | None = None) -> dict:
    """Score a trained segmenter's weights on `split` of the prepared data over `classes` (the
    manifest's by default; with `later_as_background`, classes after them count as background);
    add each of `groups`' mIoU as `<group>_miou` (over its classes that the split shows or the model
    predicts); write the scores as JSON to `path`, log the headline ones to the stage's MLflow run
    and its summary, and return them."""
    import json

    import mlflow

    from pipeline.data.atomic import write_text_atomic
    from pipeline.data.manifest import read_manifest
    from pipeline.infer.batch import evaluate_split
    from pipeline.models.transunet import network_from_state

    classes = classes or read_manifest(prepared)["classes"]
    net = network_from_state(ctx.params.model, len(classes), state)
    counts, _ = evaluate_split({"model": net.eval()}, prepared / split, ctx.params.evaluate.batch_size,
                               len(classes), 0, later_as_background=later_as_background)
    scores = counts["model"].scores(classes)
    iou = scores["per_class_iou"]
    for group, members in (groups or {}).items():
        present = [iou[c] for c in members if c in iou]
        scores[f"{group}_miou"] = sum(present) / len(present) if present else 0.0
    write_text_atomic(path, json.dumps(scores, indent=2) + "\n")
    headline = {"val_miou": scores["miou"], "val_pixel_accuracy": scores["pixel_accuracy"],
                "val_boundary_f1": scores["boundary_f1"]} | {f"{g}_miou": scores[f"{g}_miou"] for g in groups or {}}
    mlflow.log_metrics(headline)
    ctx.summary |= {key: value for key, value in headline.items() if key.endswith("miou")}
    return scores
