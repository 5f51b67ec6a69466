"""Where the time of a pipeline run goes, read back from MLflow.

    python -m pipeline.bench            # rerun every stage (dvc repro --force), then report
    python -m pipeline.bench --report   # report the latest pipeline execution only

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only report the latest execution")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
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
