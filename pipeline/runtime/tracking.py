"""MLflow tracking: one run per stage execution, grouped under one parent run per pipeline
execution (`execution_id`), tagged with the DVC stage, git commit and data manifest hash."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from pipeline.config.params import ConfigError, MlflowConfig, Params, section_dict
from pipeline.runtime.execution import dvc_process

EXECUTION_TAG = "pipeline.execution"
PARENT_TAG = "pipeline.parent"


def resolve_tracking_uri(cfg: MlflowConfig, root: Path) -> str:
    """`MLFLOW_TRACKING_URI` > `mlflow.tracking_uri` > SQLite at an absolute path in `root`."""
    return (os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
            or f"sqlite:///{(root / 'mlflow.db').resolve()}")


def execution_id() -> str:
    """Names the pipeline execution this stage belongs to: its `dvc repro` process (see
    `pipeline.runtime.execution`), unless `PIPELINE_EXECUTION_ID` says otherwise (e.g. for a driver
    script that runs stages itself)."""
    if os.environ.get("PIPELINE_EXECUTION_ID"):
        return os.environ["PIPELINE_EXECUTION_ID"]
    dvc = dvc_process()
    return f"{socket.gethostname()}-{dvc or f'{os.getpid()}-{time.time_ns()}'}"


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


# MLflow 3's UI opens an experiment of unknown kind on its GenAI pages; this one trains models.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# A view of the runs table the UI shares by link (`viewStateShareKey`): the pipeline runs with
# their data and scores as columns, which the UI's own default leaves behind "Columns".
VIEW_KEY = "pipeline"
VIEW_STATE = {"selectedColumns": ["attributes.`Dataset`", "attributes.`Duration`", "metrics.`student_miou`",
                                  "metrics.`teacher_miou`"],
              "orderByKey": "attributes.start_time", "orderByAsc": False}


def _experiment_id(client, name: str, root: Path, uri: str) -> str:
    import json

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # A local store's default artifact root is relative to the cwd; pin it inside the repo.
        location = (root / "mlartifacts").resolve().as_uri() if uri.startswith(("sqlite:", "file:")) else None
        experiment = client.get_experiment(client.create_experiment(name, artifact_location=location,
                                                                    tags=dict([EXPERIMENT_KIND])))
    tags, view = experiment.tags, json.dumps(VIEW_STATE)
    if EXPERIMENT_KIND[0] not in tags:  # made before this tag; a kind chosen in the UI stays
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    if tags.get(f"mlflow.sharedViewState.{VIEW_KEY}") != view:
        client.set_experiment_tag(experiment.experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", view)
    return experiment.experiment_id


def runs_page(uri: str, experiment_id: str) -> str:
    """Where the UI shows the experiment's runs with VIEW_STATE's columns, in its model-training
    pages: the tracking server itself, or for a local store what `make ui` serves."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"


def _find_parent(client, experiment_id: str, execution: str):
    found = client.search_runs([experiment_id], filter_string=(
        f"tags.`{EXECUTION_TAG}` = '{execution}' and tags.`{PARENT_TAG}` = 'true'"), max_results=1)
    return found[0] if found else None


def log_params(client, run_id: str, flat: dict) -> None:
    """Log many params (MLflow takes at most 100 per request)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in flat.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def _parent_run(client, experiment_id: str, execution: str, commit: str, root: Path) -> str:
    """The execution's parent run, created by its first stage with the whole pipeline's
    params (params.yaml, flattened by section), so two executions compare param by param."""
    from pipeline.config.params import PARAMS_FILE, load_params

    found = _find_parent(client, experiment_id, execution)
    if found:
        return found.info.run_id
    run = client.create_run(experiment_id, run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}",
                            tags={EXECUTION_TAG: execution, PARENT_TAG: "true", "git.commit": commit})
    params = load_params(root / PARAMS_FILE)
    flat = {}
    for section in Params.__dataclass_fields__:
        flat |= flatten(section, section_dict(params, section))
    log_params(client, run.info.run_id, flat)
    return run.info.run_id


def stage_tag(stage: str) -> str:
    """The parent run's tag for a stage: `stage.student_train/round1` for DVC's
    `student_train@round1` (MLflow keys may not hold `@`)."""
    return f"stage.{stage.replace('@', '/')}"


def finish_execution(params: Params, root: Path, execution: str, stages: list[str], metrics_file: Path,
                     returncode: int) -> str | None:
    """Close an execution's parent run: tag the stages that did not run as `cached` (or `not
    run` when the execution failed), copy the
    pipeline's metrics (e.g. student mIoU) onto it, and end it FINISHED or FAILED. Returns a
    one-line summary, or None when no stage ran (DVC had nothing to do: no parent exists)."""
    import json

    from mlflow import MlflowClient

    uri = resolve_tracking_uri(params.mlflow, root)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    parent = experiment and _find_parent(client, experiment.experiment_id, execution)
    if not parent:
        return None
    tags = parent.data.tags
    ran = [s for s in stages if tags.get(stage_tag(s)) == "ran"]
    for name in stages:  # after a failure, DVC may never have reached them
        if name not in ran:
            client.set_tag(parent.info.run_id, stage_tag(name), "cached" if returncode == 0 else "not run")
    if returncode == 0 and metrics_file.is_file():
        scores = json.loads(metrics_file.read_text())
        stamp = int(time.time() * 1000)
        from mlflow.entities import Metric

        client.log_batch(parent.info.run_id, metrics=[
            Metric(f"{role}_{key}", float(value), stamp, 0) for role, values in scores.items()
            for key, value in values.items() if isinstance(value, (int, float))])
    client.set_terminated(parent.info.run_id, "FINISHED" if returncode == 0 else "FAILED")
    return (f"MLflow run {parent.info.run_id}: ran {', '.join(ran) or 'nothing'}; "
            f"cached {', '.join(s for s in stages if s not in ran) or 'nothing'}; the runs: "
            f"{runs_page(uri, experiment.experiment_id)}" + (" (`make ui`)" if not uri.startswith("http") else ""))


def require_reachable(uri: str) -> None:
    """A ConfigError naming an http(s) tracking server that accepts no connection, before a job
    that would log to it. A local store is always there; a server behind a proxy is left to
    MLflow, whose requests go through the proxy."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or (parts.scheme in getproxies() and not proxy_bypass(parts.hostname)):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=10).close()
    except OSError as err:
        raise ConfigError(f"the MLflow tracking server {parts.scheme}://{parts.hostname}:{port} (mlflow.tracking_uri "
                          f"or MLFLOW_TRACKING_URI) cannot be reached: {err.strerror or err}") from err


def open_stage_run(stage: str, params: Params, sections: list[str], root: Path, started_at: float) -> str:
    """Create the MLflow run of one stage execution and return its id.

    Logs the stage's params sections flattened (`teacher.lr`) and tags it (the caller adds the
    data manifest hash once the manifest exists); the parent run collects the stages of one
    pipeline execution. The run starts when the stage's process did (`started_at`), whenever
    it is created, so the UI's Duration is the stage's.
    """
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(params.mlflow, root)
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, params.mlflow.experiment, root, uri)
    execution, commit = execution_id(), git_commit(root)
    parent = _parent_run(client, experiment_id, execution, commit, root)
    tags = {"mlflow.parentRunId": parent, EXECUTION_TAG: execution, "dvc.stage": stage, "git.commit": commit}
    run_id = client.create_run(experiment_id, start_time=int(started_at * 1000), run_name=stage,
                               tags=tags).info.run_id
    flat = {}
    for section in sections:
        flat |= flatten(section, section_dict(params, section))
    log_params(client, run_id, flat)
    client.set_tag(parent, stage_tag(stage), "ran")
    return run_id


class StageRun:
    """A stage execution's MLflow run (`open_stage_run`), created when first needed, or on a
    thread while the stage waits on its Ray job (`open_meanwhile`, called right before the job's
    blocking call): MLflow's imports, its store's
    first connection and the run's queries (about 1.5 s of a core here) then use the core a
    job's start leaves idle, instead of delaying the job. (A thread started any earlier would
    share the stage's one busy core under the GIL.)"""

    def __init__(self, stage: str, params: Params, sections: list[str], root: Path, started_at: float):
        self.tracking_uri = resolve_tracking_uri(params.mlflow, root)
        self._open = lambda: open_stage_run(stage, params, sections, root, started_at)
        self._opener: threading.Thread | None = None
        self._run_id: str | None = None
        self._error: BaseException | None = None
        self.active = False  # MLflow's active run: `mlflow.log_*` log to it

    def check_reachable(self) -> None:
        """Say a tracking server that does not answer now, before the stage works, not once it
        has (`require_reachable`)."""
        try:
            require_reachable(self.tracking_uri)
        except ConfigError as err:
            self._error = err  # so that closing the failed stage does not try the server again
            raise

    def open_meanwhile(self) -> None:
        """Open the run on a thread."""
        if self._opener is None and self._run_id is None and self._error is None:
            self._opener = threading.Thread(target=self._opening, daemon=True)
            self._opener.start()

    def _opening(self) -> None:
        try:
            self._run_id = self._open()
        except BaseException as err:  # noqa: BLE001 -- raised where the id is asked for
            self._error = err

    def opened_id(self) -> str:
        """The run's id: waits for `open_meanwhile`'s thread, or opens the run now."""
        if self._opener is not None:
            self._opener.join()
        elif self._run_id is None and self._error is None:
            self._opening()
        if self._error is not None:
            raise self._error
        return self._run_id

    def activate(self) -> str:
        """Make the run MLflow's active run until `close`; its id."""
        import mlflow

        run_id = self.opened_id()
        if not self.active:
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.start_run(run_id=run_id)
            self.active = True
        return run_id

    def close(self, failure: BaseException | None = None) -> None:
        """End the run: FINISHED, or FAILED with `failure`, which also opens a run not opened
        yet, so that every failed stage execution is on record."""
        import mlflow

        if failure is None:
            self.activate()
            mlflow.end_run("FINISHED")
            return
        try:
            if self.active:
                mlflow.end_run("FAILED")
            else:
                mlflow.MlflowClient(self.tracking_uri).set_terminated(self.opened_id(), "FAILED")
        except BaseException:  # noqa: BLE001, S110 -- the tracking store fails too: the stage's own error is the one to see
            pass


def metric_history_csv(tracking_uri: str | None, run_id: str) -> str:
    """A run's metrics by step (epoch), one column each, as CSV."""
    import csv
    import io

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    keys = sorted(k for k in client.get_run(run_id).data.metrics if k != "epoch")  # the step is the epoch
    rows: dict[int, dict] = {}
    for key in keys:
        for metric in client.get_metric_history(run_id, key):
            rows.setdefault(metric.step, {})[key] = metric.value
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["epoch", *keys], lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow({"epoch": step, **rows[step]})
    return out.getvalue()


def log_prepared_data(prepared: Path, manifest: dict, digest: str) -> None:
    """The prepared data as an MLflow dataset input of the active stage run and of its
    pipeline's parent run (the runs table's Dataset column): named by its format and labeled
    fraction, identified by the manifest's digest, so two runs' data differ exactly when their
    digests do."""
    import json

    import mlflow
    from mlflow.entities import Dataset, DatasetInput, InputTag

    run = mlflow.active_run()
    if run is None:
        return
    dataset = Dataset(name=f"{manifest['format']} ({manifest['labeled_fraction']:g} labeled)", digest=digest,
                      source_type="local", source=json.dumps({"uri": Path(prepared).resolve().as_uri()}),
                      profile=json.dumps(manifest.get("counts", {})))
    used = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])]
    client = mlflow.MlflowClient()
    client.log_inputs(run.info.run_id, datasets=used)
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent and not any(d.dataset.digest == digest for d in client.get_run(parent).inputs.dataset_inputs):
        client.log_inputs(parent, datasets=used)


def tag_with_parent(key: str, value: str) -> None:
    """Tag the active stage run and its pipeline's parent run."""
    import mlflow

    run = mlflow.active_run()
    mlflow.set_tag(key, value)
    parent = run.data.tags.get("mlflow.parentRunId") if run else None
    if parent:
        mlflow.MlflowClient().set_tag(parent, key, value)


def log_metrics(tracking_uri: str | None, run_id: str, metrics: dict, step: int) -> None:
    """Log scalar metrics to a run, stamped now."""
    log_metric_steps(tracking_uri, run_id, [(step, int(time.time() * 1000), metrics)])


def log_metric_steps(tracking_uri: str | None, run_id: str, steps: list[tuple[int, int, dict]]) -> None:
    """Log several steps' scalar metrics to a run, each given as (step, timestamp in ms, metrics),
    in as few requests as MLflow allows (1,000 metrics each)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    batch = [Metric(key, float(value), stamp, step) for step, stamp, metrics in steps for key, value in metrics.items()]
    client = MlflowClient(tracking_uri)
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start:start + 1000])
