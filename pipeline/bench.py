"""Where the time of a pipeline run goes, read back from MLflow.

    python -m pipeline.bench            # rerun every stage (dvc repro --force), then report
    python -m pipeline.bench --report   # report the latest pipeline execution only
    python -m pipeline.bench --scale-out  # batch inference (plain loop vs Ray Data, 1 and 2
                                          # actors) and a training stage on 1 vs 2 Ray workers

Per stage: wall seconds (the stage process, imports included), seconds inside the training
loop, and the difference (Ray start-up, data loading, checkpointing, export: the overhead).
Plus the total wall time of `dvc repro` and the val mIoU of teacher and student.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import load_params
from pipeline.tracking import EXECUTION_TAG, PARENT_TAG, resolve_tracking_uri

STAGES = ["prepare", "encoder_init", "decoder_pretrain", "teacher_finetune", "pseudo_label", "student_train",
          "evaluate"]


def latest_stage_runs(tracking_uri: str, experiment: str) -> dict[str, dict]:
    """Metrics of each stage run under the most recent pipeline parent run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"error: no MLflow experiment {experiment!r} at {tracking_uri}; run the pipeline first")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = 'true'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        sys.exit("error: no pipeline run found; run the pipeline first")
    execution = parents[0].data.tags[EXECUTION_TAG]
    children = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{EXECUTION_TAG}` = '{execution}' and tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"))
    return {run.data.tags["dvc.stage"]: run.data.metrics for run in children}


def report(runs: dict[str, dict], total_s: float | None) -> str:
    lines = [f"{'stage':<18}{'wall s':>9}{'loop s':>9}{'overhead s':>12}"]
    for stage in STAGES:
        m = runs.get(stage)
        if m is None:
            lines.append(f"{stage:<18}{'(cached: not run in this execution)':>30}")
            continue
        loop = f"{m['loop_s']:.1f}" if "loop_s" in m else "-"
        overhead = f"{m['overhead_s']:.1f}" if "overhead_s" in m else "-"
        lines.append(f"{stage:<18}{m.get('wall_s', float('nan')):>9.1f}{loop:>9}{overhead:>12}")
    stage_total = sum(m.get("wall_s", 0.0) for m in runs.values())
    lines.append(f"{'sum of stages':<18}{stage_total:>9.1f}")
    if total_s is not None:
        lines.append(f"{'dvc repro total':<18}{total_s:>9.1f}")
    evaluate = runs.get("evaluate", {})
    if "teacher_miou" in evaluate:
        lines.append(f"val mIoU: teacher {evaluate['teacher_miou']:.4f}, student {evaluate['student_miou']:.4f}")
    return "\n".join(lines)


def _drain(rows) -> None:
    for _ in rows:
        pass


def inference_throughput(prepared: Path, teacher: Path, params, threads: int = 1) -> dict[str, float]:
    """Images/s of pseudo-labelling the unlabeled split (predict + PNG-encode the rows): a plain
    in-process loop, then the Ray Data pipeline with 1 and 2 actors, `threads` each. Ray is
    started first, as `make run` has it running; actor start-up counts."""
    from dataclasses import replace

    import ray
    import torch

    from pipeline.checkpoints import load_segmenter
    from pipeline.data import read_manifest
    from pipeline.inference import local_predictions, pseudo_label_rows, ray_predictions
    from pipeline.raytrain import init_ray

    manifest = read_manifest(prepared)
    split, columns = prepared / "unlabeled", ["id", "image", "mask"]
    net = load_segmenter(teacher, params.model, manifest["classes"])
    state = net.state_dict()
    confusion = torch.zeros(manifest["num_classes"], manifest["num_classes"], dtype=torch.long)
    images = manifest["counts"]["unlabeled"]
    torch.set_num_threads(threads)
    started = time.perf_counter()
    _drain(pseudo_label_rows(local_predictions({"teacher": net}, split, columns, params.pseudo.batch_size,
                                               params.pseudo.flip_tta, "plain loop"), "teacher", confusion))
    result = {"plain_loop": images / (time.perf_counter() - started)}
    for actors in (1, 2):
        ray_cfg = replace(params.ray, cpus_per_worker=threads, inference_actors=actors)
        init_ray(ray_cfg)
        started = time.perf_counter()
        _drain(pseudo_label_rows(ray_predictions({"teacher": state}, params.model, manifest["num_classes"], split,
                                                 columns, params.pseudo.batch_size, params.pseudo.flip_tta, ray_cfg),
                                 "teacher", confusion))
        result[f"ray_data_{actors}_actors"] = images / (time.perf_counter() - started)
        ray.shutdown()  # the next pool size gets a fresh local Ray of its own size
    return result


def training_scaling(prepared: Path, pretrained: Path, batch: int, steps: int = 200) -> dict[str, float]:
    """Images/s inside the teacher's training loop with the same global batch on 1 Ray worker
    (2 threads) and on 2 workers (1 thread each, DDP over gloo)."""
    import tempfile

    result = {}
    for workers, cpus in ((1, 2), (2, 1)):
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(
                [sys.executable, "stages/teacher_finetune.py", "--prepared", str(prepared), "--pretrained",
                 str(pretrained), "--out", f"{tmp}/teacher.pt", "--set", "teacher.epochs=1",
                 "--set", f"teacher.steps_per_epoch={steps}", "--set", f"ray.num_workers={workers}",
                 "--set", f"ray.cpus_per_worker={cpus}", "--set", f"ray.storage_path={tmp}/ray"],
                capture_output=True, text=True, check=True).stdout
        summary = next(line for line in out.splitlines() if line.startswith("[teacher_finetune] done:"))
        loop_s = float(summary.split("loop_s=")[1].split(",")[0])
        result[f"{workers}_workers"] = steps * batch / loop_s
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only report the latest execution")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--scale-out", action="store_true",
                        help="measure batch inference (plain vs Ray Data, 1 and 2 actors) and 1 vs 2 training workers")
    args = parser.parse_args(argv)
    if args.scale_out:
        params = load_params()
        figures = {"inference_images_per_s": inference_throughput(Path("data/prepared"), Path("models/teacher.pt"), params),
                   "training_images_per_s": training_scaling(Path("data/prepared"), Path("models/pretrained.pt"),
                                                             params.teacher.batch_size)}
        inference, training = figures["inference_images_per_s"], figures["training_images_per_s"]
        print(f"batch inference (pseudo_label, 1 thread per actor), images/s: plain loop {inference['plain_loop']:.0f}, "
              f"Ray Data 1 actor {inference['ray_data_1_actors']:.0f} "
              f"({inference['ray_data_1_actors'] / inference['plain_loop']:.2f}x), 2 actors "
              f"{inference['ray_data_2_actors']:.0f} ({inference['ray_data_2_actors'] / inference['ray_data_1_actors']:.2f}x "
              f"of 1 actor)")
        print(f"teacher training, images/s in the loop: 1 worker x 2 threads {training['1_workers']:.0f}, "
              f"2 workers x 1 thread {training['2_workers']:.0f} ({training['2_workers'] / training['1_workers']:.2f}x)")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        return
    total = None
    if not args.report:
        started = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "pipeline.cluster", "--", "dvc", "repro", "--force"],
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if rc:
            sys.exit(rc)
        total = time.perf_counter() - started
    params = load_params()
    runs = latest_stage_runs(resolve_tracking_uri(params.mlflow, Path.cwd()), params.mlflow.experiment)
    print(report(runs, total))
    if args.json:
        args.json.write_text(json.dumps({"stages": runs, "dvc_repro_seconds": total}, indent=2))


if __name__ == "__main__":
    main()
