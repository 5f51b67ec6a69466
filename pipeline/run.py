"""Run the pipeline: `python -m pipeline.run [dvc repro options]` (what `make run` does).

`dvc repro` with one MLflow parent run for the execution: its stages are the child runs, and
at the end the parent is closed with the stages DVC reused from its cache tagged `cached`, the
pipeline's metrics, and FINISHED or FAILED. Its stages share one local Ray (unless
`RAY_ADDRESS` names a cluster), started as soon as DVC is (`pipeline.runtime.local_ray`). A bare
`dvc repro` works too; its Ray starts with its first Ray stage, and its parent run is just
never closed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml


def dvc_paths(root: Path) -> dict[str, str]:
    """The outputs dvc.yaml names once, in its `vars: paths` (e.g. `metrics`, `figures`)."""
    return yaml.safe_load((root / "dvc.yaml").read_text())["vars"][0]["paths"]


def main(argv: list[str] | None = None) -> int:
    from pipeline.config.params import ConfigError, hub_release_at_hand, load_params, standin_encoder
    from pipeline.orchestrate.stage_run import collect_nothing_at_exit
    from pipeline.runtime.console_log import TeedProcess, new_log
    from pipeline.runtime.local_ray import params_ray_config, prestart_execution_ray
    from pipeline.runtime.tracking import finish_execution

    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Other options and targets are passed to `dvc repro` (see `dvc repro --help`).")
    _, args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    root = Path.cwd()
    try:
        params = load_params()
        if params.encoder.init == "supervised":
            standin_encoder(params.model.preset, root)
        if params.encoder.init == "timm" and not params.encoder.weights_path:
            hub_release_at_hand(params.encoder.release(params.model.preset))
        ray_cfg = params_ray_config()
    except ConfigError as err:
        sys.exit(f"error: {err}")
    started = time.monotonic()
    execution = os.environ.get("PIPELINE_EXECUTION_ID") or f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
    collect_nothing_at_exit()
    code = 130  # interrupted, unless dvc returns
    dvc, ray_session = None, None
    try:
        with frozen_locks_kept(root):
            dvc = TeedProcess(["dvc", "repro", *args], {**os.environ, "PIPELINE_EXECUTION_ID": execution},
                              new_log(root))
            try:
                ray_session = prestart_execution_ray(dvc.pid, ray_cfg)
                code = dvc.wait()
            except BaseException:
                dvc.kill()
                raise
    finally:
        paths = dvc_paths(root)
        metrics = root / paths["metrics"]
        # DVC's names for the stages, each `foreach` instance (`student_train@round1`) on its own.
        stages = subprocess.run(["dvc", "stage", "list", "--name-only"], capture_output=True, text=True,
                                check=True).stdout.split()
        summary = finish_execution(params, root, execution, stages, metrics, code)
        if code == 0 and summary and metrics.is_file():
            summary = "\n".join([*outcome(metrics, time.monotonic() - started, paths["figures"]), summary])
        if code != 0 and dvc is not None:
            summary = "\n".join(filter(None, [summary, failure(code, dvc.failed_stages,
                                                               dvc.log.relative_to(root), ray_session)]))
        if summary:
            print(summary, file=sys.stderr)
        if dvc is not None:
            if summary:
                dvc.write(f"{summary}\n".encode())
            dvc.close()
    return code


def failure(code: int, stages: list[str], log: Path, ray_session: str | None) -> str:
    """The last line of a run that did not succeed: which stage failed, where its whole output is."""
    if stages:
        what = f"stage{'s' if len(stages) > 1 else ''} {', '.join(map(repr, stages))} failed"
    else:
        what = "interrupted" if code in (130, -2) else f"dvc repro exited with {code}"
    return (f"error: {what}; the run's whole output is in {log}"
            + (f", Ray's own logs in {ray_session}/logs" if ray_session else ""))


def outcome(metrics_file: Path, seconds: float, figures: str) -> list[str]:
    """What a person reads at the end of a run: the scores, the gain, the time, the pictures."""
    import json

    scores = json.loads(metrics_file.read_text())
    lines = []
    if {"teacher", "student"} <= set(scores):
        teacher, student = scores["teacher"], scores["student"]
        line = (f"val mIoU: teacher {teacher['miou']:.3f}, student {student['miou']:.3f} "
                f"({student['miou'] - teacher['miou']:+.3f})")
        if "boundary_f1" in teacher and "boundary_f1" in student:
            line += f"; boundary F1: {teacher['boundary_f1']:.3f} -> {student['boundary_f1']:.3f}"
        lines.append(line)
    minutes, rest = divmod(round(seconds), 60)
    lines.append(f"took {minutes} min {rest} s; figures in {figures}/ (every plot in one page: make report; "
                 "every score: dvc metrics show)")
    return lines


@contextlib.contextmanager
def frozen_locks_kept(root: Path) -> Iterator[None]:
    """Put back, after DVC, the lock file of every dvc.yaml whose stages are all frozen (the
    shipped stand-in encoder's): `dvc repro --force` never runs a frozen stage but rewrites its
    dependencies' hashes in dvc.lock (DVC issue #11004), which would then claim the shipped
    weights were made from today's code."""
    kept = {}
    for dvc_file in root.glob("*/dvc.yaml"):
        stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages") or {}
        lock = dvc_file.with_suffix(".lock")
        if stages and lock.is_file() and all(stage.get("frozen") for stage in stages.values()):
            kept[lock] = lock.read_bytes()
    try:
        yield
    finally:
        for lock, content in kept.items():
            if not lock.is_file() or lock.read_bytes() != content:
                lock.write_bytes(content)


if __name__ == "__main__":
    sys.exit(main())
