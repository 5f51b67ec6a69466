"""What every stage script does around its work: read params, open the MLflow run, time it,
print one summary line, and turn our known errors into one readable message and exit 1."""

from __future__ import annotations

import argparse
import atexit
import errno
import gc
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config.params import ConfigError, Params, load_params
from pipeline.runtime.execution import peak_rss_mb, seconds_since_start

if TYPE_CHECKING:
    from pipeline.runtime.tracking import StageRun


def process_started_at() -> float:
    """When this process started: a stage's interpreter and imports count in its time too."""
    return time.time() - seconds_since_start(os.getpid())


def collect_nothing_at_exit() -> None:
    """A stage's process exits once its work is done, and Python's exit would then run full
    garbage-collection passes over the ~500,000 objects torch, timm, Ray and MLflow made: 1.5-2 s
    of a core per process on 2 cores, for nothing anyone needs. Frozen objects are skipped by
    those passes; the exit's threads, atexit hooks and flushes run as always."""
    atexit.register(gc.freeze)


@dataclass
class StageContext:
    name: str
    params: Params
    root: Path
    run: StageRun  # its MLflow run
    started_at: float  # wall clock when the stage's process started
    curves: Path | None = None  # where `training.train` writes the per-epoch metrics (CSV, a DVC plot)
    summary: dict = field(default_factory=dict)
    trained_at: float | None = None  # wall clock when the Ray Train job returned

    def active_run_id(self) -> str:
        """The stage's MLflow run, opened if it is not yet, and MLflow's active run from here
        on: a stage body calls this before its own `mlflow.log_*` calls."""
        return self.run.activate()

    def while_job_starts(self, *imports: str, wait: bool = False) -> None:
        """Call right before the stage's Ray job blocks (Train's `fit()`, the first batch asked of
        a Ray Data pipeline): the MLflow run is opened, and `imports` (what the stage needs after
        the job) imported, on threads that use the core a job's start leaves idle. With `wait`,
        both are done when this returns: a stage with no job to wait on (the benchmark's plain
        baseline) does them before its work, not beside it."""
        if wait:
            import importlib

            self.run.opened_id()
            for module in imports:
                importlib.import_module(module)
            return
        from pipeline.runtime.meanwhile import import_meanwhile

        self.run.open_meanwhile()
        import_meanwhile(*imports)


UNWRITABLE = (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM)
EXIT_GRACE_S = 20


def exit_within(seconds: float) -> None:
    """A failing stage must end, never wait: from now on, whatever unwinding and exit clean-up
    Python, Ray and MLflow run (thread joins, exit hooks, the interpreter's teardown) gets
    `seconds`; a process still there after them prints every thread's stack to stderr and exits
    with 1. faulthandler's watchdog is a C thread, so it fires even when the hang holds the GIL
    or sits in the interpreter's last teardown. (Tests that run a stage in their own process
    cancel it: `faulthandler.cancel_dump_traceback_later`.)"""
    import faulthandler

    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)  # fd 2, whatever replaced sys.stderr


def fail(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    exit_within(EXIT_GRACE_S)
    sys.exit(1)


def known_errors() -> tuple[type[Exception], ...]:
    from pipeline.data.shards import DataError
    from pipeline.models.checkpoints import CheckpointError
    from pipeline.models.foundation import FoundationError

    return (ConfigError, DataError, CheckpointError, FoundationError)


def known_cause(err: BaseException) -> Exception | None:
    """One of our known errors behind `err`: Ray hands the driver a worker's or an actor's
    exception wrapped (a task error's `cause`, Ray Train's per-rank `worker_failures`, chained
    exceptions), so the one-line message would otherwise drown in Ray's traceback."""
    todo, seen = [err], set()
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(cause, known_errors()):
            return cause
        if isinstance(current, known_errors()):
            return current
        todo += [e for e in (cause, current.__cause__, getattr(current, "controller_failure", None),
                             *getattr(current, "worker_failures", {}).values(),
                             *getattr(current, "exceptions", ()))  # an ExceptionGroup's
                 if isinstance(e, BaseException)]
    return None


def stage_parser(description: str | None, training: bool = False) -> argparse.ArgumentParser:
    """A stage script's argument parser, with `--set key=value` params overrides (how a study
    runs the same stage at other settings) and, for training stages, `--curves`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one params.yaml value for this run, e.g. decoder_pretrain.sigma=0.4")
    if training:
        parser.add_argument("--curves", type=Path, help="write the per-epoch training metrics here (CSV)")
    return parser


def dvc_stage_name(script_stage: str) -> str:
    """`student_train@round2` when DVC runs this script as that instance of a `foreach` stage
    (DVC names the running stage in `DVC_STAGE`), so each round is its own MLflow run and Ray
    Train job; otherwise the script's own stage name."""
    running = os.environ.get("DVC_STAGE", "").rpartition(":")[2]
    return running if running.startswith(f"{script_stage}@") else script_stage


@contextmanager
def stage(name: str, sections: list[str], prepared: Path | None = None,
          params_file: str = "params.yaml", overrides: list[str] = (),
          curves: Path | None = None) -> Iterator[StageContext]:
    """Run a stage body as one MLflow run; logs wall time and prints the summary line.

    The run is created when first needed, not at the start: on a thread while the stage's Ray
    job starts (`ctx.while_job_starts`), or when the body asks for it (`ctx.active_run_id()`,
    before its own `mlflow.log_*` calls), or here at the end; it starts when the process did,
    whenever it is created. A tracking server that does not answer is said at the start."""
    name = dvc_stage_name(name)
    collect_nothing_at_exit()
    started_at = process_started_at()
    run = None
    try:
        params = load_params(params_file, overrides)
        from pipeline.data.manifest import manifest_hash, read_manifest
        from pipeline.runtime.tracking import StageRun, log_metrics, log_prepared_data, tag_with_parent

        run = StageRun(name, params, sections, Path.cwd(), started_at)
        run.check_reachable()
        ctx = StageContext(name, params, Path.cwd(), run, started_at, curves=curves)
        yield ctx
        if not run.active and "mlflow" in sys.modules and (stray := sys.modules["mlflow"].active_run()) is not None:
            sys.modules["mlflow"].end_run("FAILED")
            raise RuntimeError(f"{name}: the stage logged to MLflow before `ctx.active_run_id()`, so MLflow "
                               f"started a run of its own ({stray.info.run_id}, ended FAILED)")
        run_id = ctx.active_run_id()
        if prepared is not None:  # read at the end: `prepare` writes the manifest itself
            digest = manifest_hash(prepared)
            tag_with_parent("data.manifest_hash", digest)
            log_prepared_data(prepared, read_manifest(prepared), digest)
        if ctx.curves is not None and "loop_s" not in ctx.summary:  # nothing trained (e.g. weights from a file)
            from pipeline.data.atomic import write_text_atomic

            write_text_atomic(ctx.curves, "epoch\n")
        now = time.time()
        ctx.summary["wall_s"] = now - ctx.started_at
        if ctx.trained_at is not None:  # after the Ray job: curves, outputs, scores, MLflow
            ctx.summary["finish_s"] = now - ctx.trained_at
        ctx.summary["peak_rss_mb"] = peak_rss_mb()
        if "loop_s" in ctx.summary:
            ctx.summary["overhead_s"] = ctx.summary["wall_s"] - ctx.summary["loop_s"]
        # The per-epoch loss is already logged, each epoch's (`runtime.epoch_log`).
        log_metrics(run.tracking_uri, run_id, {k: v for k, v in ctx.summary.items() if k != "loss"
                                   and isinstance(v, (int, float)) and not isinstance(v, bool)}, 0)
        run.close()
    except BaseException as err:
        if run is not None:
            run.close(err)
        if (ours := known_cause(err)) is not None:  # ours, raised here or on a Ray worker or actor
            # Ray Data appends its retry advice to an error from an actor, on lines of its own.
            fail(f"error: {ours}" if ours is err else f"error: {(str(ours).splitlines() or [repr(ours)])[0]}")
        if isinstance(err, OSError) and err.errno in UNWRITABLE:
            fail(f"error: cannot write {err.filename or 'an output'}: {err.strerror}")
        exit_within(EXIT_GRACE_S)  # a bug, another failure inside Ray, Ctrl-C: Python shows the traceback
        raise
    parts = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in ctx.summary.items())
    print(f"[{name}] done: {parts}", flush=True)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        # Now rather than from Ray's exit hook, which first waits half a second for late error
        # messages from workers: a stage that got here has none.
        sys.modules["ray"].shutdown()
