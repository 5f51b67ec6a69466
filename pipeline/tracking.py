"""MLflow tracking: one run per stage execution, grouped under one parent run per pipeline
execution, tagged with the DVC stage, git commit and data manifest hash.

A `dvc repro` runs every stage as a child process of itself, so the stages of one execution
share the DVC process as an ancestor; its pid and start time name the execution
(`PIPELINE_EXECUTION_ID` overrides, e.g. for a driver script that runs stages itself).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import MlflowConfig, Params, section_dict

EXECUTION_TAG = "pipeline.execution"
PARENT_TAG = "pipeline.parent"


def resolve_tracking_uri(cfg: MlflowConfig, root: Path) -> str:
    """`MLFLOW_TRACKING_URI` > `mlflow.tracking_uri` > SQLite at an absolute path in `root`."""
    return (os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
            or f"sqlite:///{(root / 'mlflow.db').resolve()}")


def _proc_stat(pid: int) -> tuple[int, str]:
    """(parent pid, start time in clock ticks) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), fields[19]


def execution_id() -> str:
    """Names the pipeline execution this stage belongs to (see the module docstring)."""
    if os.environ.get("PIPELINE_EXECUTION_ID"):
        return os.environ["PIPELINE_EXECUTION_ID"]
    pid = os.getpid()
    try:
        for _ in range(4):
            pid, _ = _proc_stat(pid)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"dvc" in cmdline and b"repro" in cmdline or b"dvc exp" in cmdline:
                return f"{socket.gethostname()}-{pid}-{_proc_stat(pid)[1]}"
    except (OSError, IndexError, ValueError):
        pass
    return f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"


def git_commit(root: Path) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        # DVC's lock files and the study plan change as the pipeline runs; only other edits
        # mean the code differs from the commit.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude,glob)**/dvc.lock", ":(exclude)study/plan.yaml"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out |= flatten(f"{prefix}.{key}", item)
        return out
    return {prefix: value}


def _experiment_id(client, name: str, root: Path, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A local store's default artifact root is relative to the cwd; pin it inside the repo.
    location = (root / "mlartifacts").resolve().as_uri() if uri.startswith(("sqlite:", "file:")) else None
    return client.create_experiment(name, artifact_location=location)


def _parent_run(client, experiment_id: str, execution: str, commit: str) -> str:
    found = client.search_runs([experiment_id], filter_string=(
        f"tags.`{EXECUTION_TAG}` = '{execution}' and tags.`{PARENT_TAG}` = 'true'"), max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}",
                            tags={EXECUTION_TAG: execution, PARENT_TAG: "true", "git.commit": commit})
    return run.info.run_id


@contextmanager
def stage_run(stage: str, params: Params, sections: list[str], root: Path) -> Iterator[str]:
    """Open the MLflow run of one stage execution and yield its id.

    Logs the stage's params sections flattened (`teacher.lr`), tags it (the caller adds the
    data manifest hash once the manifest exists), and marks it FAILED
    if the stage raises. The parent run collects the stages of one pipeline execution.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(params.mlflow, root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, params.mlflow.experiment, root, uri)
    execution, commit = execution_id(), git_commit(root)
    parent = _parent_run(client, experiment_id, execution, commit)
    tags = {"mlflow.parentRunId": parent, EXECUTION_TAG: execution, "dvc.stage": stage, "git.commit": commit}
    run = client.create_run(experiment_id, run_name=stage, tags=tags)
    run_id = run.info.run_id
    flat = {}
    for section in sections:
        flat |= flatten(section, section_dict(params, section))
    client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in flat.items()])
    client.set_tag(parent, f"stage.{stage}", "ran")
    try:
        with mlflow.start_run(run_id=run_id):
            yield run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise


def log_metrics(tracking_uri: str | None, run_id: str, metrics: dict, step: int) -> None:
    """Log scalar metrics to a run from anywhere (a Ray worker included)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    MlflowClient(tracking_uri).log_batch(run_id, metrics=[
        Metric(key, float(value), stamp, step) for key, value in metrics.items()])
