"""The performance benchmark: every figure side by side with a plain-PyTorch baseline.

    python -m pipeline.tools.bench            # everything below (what `make bench` runs), then the table
    python -m pipeline.tools.bench --report   # only the per-stage table of the latest pipeline run (MLflow)
    python -m pipeline.tools.bench readme     # the table of reports/bench.json into README.md
    python -m pipeline.tools.bench processes  # the processes one teacher stage starts, their CPU, their share beside its loop
    python -m pipeline.tools.bench empty-job  # the seconds of one Ray Train job that trains nothing

One invocation measures, on this machine and the params in params.yaml:
1. the whole default pipeline (`python -m pipeline.run --force`) and a no-op `dvc repro`;
   per stage: wall seconds (process start to end), seconds in the training loop, the
   difference (the overhead), seconds to load the data into memory, and peak memory;
2. for each training stage, `--steps` steps of the stage's own recipe, batch, data and
   threads in its Ray Train job against the same steps in a plain PyTorch process
   (`python -m pipeline.tools.plain stages/<stage>.py`), in `--repeats` alternated pairs: images/s, and the ratio
   as the median of each pair's own (a drift in the machine's speed cancels within a pair),
   and the seconds each takes to get the data into memory; plus the teacher on 2 Ray
   workers with half the threads each (the same global batch, DDP over gloo);
3. the teacher's plain loop at cpus_per_worker threads against fewer and more (the cost of
   oversubscribing the cores);
4. batch inference (pseudo_label's unlabeled split, evaluate's val split): a plain
   `torch.no_grad()` loop against the Ray Data pipeline with 1 actor × 2 threads and
   2 actors × 1 thread, start-up included, and how long the first row took (the start-up),
   beside the first row of the same pipeline whose one actor only imports torch (its floor);
5. the floor under every training stage's overhead: a Ray Train job with the stages' settings
   whose workers train nothing, from its process's start to its result.
It prints a table, writes `reports/bench.json` and logs both to MLflow (run `bench`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pipeline.config.params import ConfigError, load_params
from pipeline.runtime.tracking import EXECUTION_TAG, PARENT_TAG, git_commit, resolve_tracking_uri

FIRST_ROUND = "round1"  # of `self_training.rounds`: the default pipeline's one round
STAGES = ["prepare", "encoder_init", "decoder_pretrain", "teacher_finetune", f"pseudo_label@{FIRST_ROUND}",
          f"student_train@{FIRST_ROUND}", "evaluate"]
BENCH_JSON = Path("reports/bench.json")
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"
GPU_README_BEGIN, GPU_README_END = "<!-- gpu-bench:begin -->", "<!-- gpu-bench:end -->"
# A training stage's overhead, in the order it is spent (pipeline.orchestrate.stage_run and train.launch.job_phases).
PHASES = {"startup_s": "start-up", "ray_connect_s": "Ray connect", "job_start_s": "job start",
          "worker_setup_s": "worker setup", "report_s": "reports", "job_end_s": "job end", "finish_s": "finish"}
# The per-stage table's columns after the wall time, in the terminal and in the README alike.
STAGE_COLUMNS = {"loop_s": "in the loop s", "overhead_s": "overhead s", **PHASES, "data_s": "data load s"}
TARGETS = {"training_ratio": 0.95, "overhead_above_floor_s": 5.0, "noop_repro_s": 2.0, "pipeline_s": 360.0,
           "inference_ratio": 0.9, "first_row_above_floor_s": 3.0, "smoke_s": 60.0}


# ----------------------------------------------------------------- 1. the pipeline, per stage

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


def stage_table(runs: dict[str, dict]) -> str:
    lines = [f"{'stage':<22}{'wall s':>8}" + "".join(f"{title:>{len(title) + 2}}" for title in STAGE_COLUMNS.values())
             + f"{'peak MiB':>10}"]
    for stage in STAGES:
        m = runs.get(stage)
        if m is None:
            lines.append(f"{stage:<22}  (cached: not run in this execution)")
            continue
        cells = "".join(f"{f'{m[k]:.1f}' if k in m else '-':>{len(title) + 2}}" for k, title in STAGE_COLUMNS.items())
        peak = max(m.get("peak_rss_mb", 0.0), m.get("worker_peak_rss_mb", 0.0))
        lines.append(f"{stage:<22}{m.get('wall_s', float('nan')):>8.1f}{cells}{peak:>10.0f}")
    lines.append(f"{'sum of stages':<22}{sum(m.get('wall_s', 0.0) for m in runs.values()):>8.1f}")
    return "\n".join(lines)


def timed(command: list[str], env: dict | None = None, cwd: Path | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=cwd)
    return time.perf_counter() - started


def pipeline_figures(against: str | None) -> dict:
    """Rerun the whole pipeline, then a repro with nothing to do; the stages from MLflow; then
    the `smoke` preset's whole pipeline (`smoke_pipeline_s`). With `against` (a git revision),
    then that revision's default pipeline the same way, in a worktree of its own: the same
    machine a minute later, so the two compare as a ratio."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pipeline_s = timed([sys.executable, "-m", "pipeline.run", "--force"], env)
    noop_s = timed(["dvc", "repro"], env)
    params = load_params()
    runs = latest_stage_runs(resolve_tracking_uri(params.mlflow, Path.cwd()), params.mlflow.experiment)
    fig = {"pipeline_s": pipeline_s, "noop_repro_s": noop_s, "stages": runs,
           "smoke_s": smoke_pipeline_s(resolve_commit("HEAD"), env)}
    if against:
        commit = resolve_commit(against, f"--against {against}")
        fig["against"] = {"revision": against, "pipeline_s": other_revision_pipeline_s(commit, env)}
    return fig


def resolve_commit(revision: str, given_as: str | None = None) -> str:
    """The commit `revision` names; an error naming it (`given_as`, e.g. the option it came
    from) before anything runs if there is none here (a shallow clone may lack an earlier
    default's commit)."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"],
                           capture_output=True, text=True, check=False)
    if found.returncode != 0:
        sys.exit(f"error: {given_as or revision}: not a commit of this repository")
    return found.stdout.strip()


def smoke_pipeline_s(commit: str, env: dict) -> float:
    """Seconds of the `smoke` preset's whole pipeline, every stage run (`python -m pipeline.compose
    experiment=smoke`, then `python -m pipeline.run --force`, as a test or a quick look runs it), in
    a worktree of `commit`."""
    def run(tree: Path, tree_env: dict) -> float:
        print(f"the smoke preset's pipeline at {commit[:10]} ({tree})", flush=True)
        subprocess.run([sys.executable, "-m", "pipeline.compose", "experiment=smoke"], env=tree_env, cwd=tree,
                       check=True, stdout=subprocess.DEVNULL)
        return timed([sys.executable, "-m", "pipeline.run", "--force"], tree_env, cwd=tree)

    return in_worktree(commit, env, run)


def other_revision_pipeline_s(commit: str, env: dict) -> float:
    """Seconds of `python -m pipeline.run --force` in a worktree of `commit`, as a fresh clone
    would run it."""
    def run(tree: Path, tree_env: dict) -> float:
        print(f"the default pipeline at {commit[:10]} ({tree})", flush=True)
        return timed([sys.executable, "-m", "pipeline.run", "--force"], tree_env, cwd=tree)

    return in_worktree(commit, env, run)


def in_worktree(commit: str, env: dict, run):
    """`run(tree, tree_env)` in a temporary git worktree of `commit`: `tree_env` is `env` with that
    commit's code on PYTHONPATH (this environment's packages) and MLflow runs going to a store
    of their own, so they never become this project's latest or champion."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), commit], check=True)
        try:
            return run(tree, {**env, "PYTHONPATH": str(tree), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False)


# ------------------------------------------------- 2-3. training: Ray Train job vs plain loop

def _paths() -> dict[str, str]:
    return yaml.safe_load(Path("dvc.yaml").read_text())["vars"][0]["paths"]


def training_commands(tmp: Path) -> dict[str, tuple[str, list[str]]]:
    """Per training stage: its params section and the stage script's arguments, reading the
    last run's outputs and writing into `tmp`."""
    p = _paths()
    return {
        "encoder_init": ("encoder", ["--prepared", p["prepared"], "--out", f"{tmp}/encoder.pt"]),
        "decoder_pretrain": ("decoder_pretrain", ["--prepared", p["prepared"], "--encoder", p["encoder"],
                                                  "--out", f"{tmp}/pretrained.pt", "--figures", f"{tmp}/figures"]),
        "teacher_finetune": ("teacher", ["--prepared", p["prepared"], "--pretrained", p["pretrained"],
                                         "--out", f"{tmp}/teacher.pt"]),
        "student_train": ("student", ["--prepared", p["prepared"], "--pseudo", f"{p['pseudo']}/{FIRST_ROUND}",
                                      "--teacher", p["teacher"], "--pretrained", p["pretrained"],
                                      "--out", f"{tmp}/student.pt"]),
    }


def short_run(args: list[str], section: str, steps: int, tmp: Path) -> list[str]:
    """A stage script's arguments for one epoch of `steps` steps, its checkpoints under `tmp`."""
    return [*args, "--set", f"{section}.epochs=1", "--set", f"{section}.steps_per_epoch={steps}",
            "--set", f"ray.storage_path={tmp}/ray"]


def images_per_step(params, section: str) -> int:
    cfg = getattr(params, section)
    return cfg.batch_size + (cfg.unlabeled_batch_size if section == "student" else 0)


def run_stage(stage: str, args: list[str], env: dict, plain: bool = False) -> dict:
    """Run a stage script (with `plain`, its training in one plain process: `pipeline.tools.plain`);
    its summary line (`[stage] done: k=v, ...`) as a dict of numbers."""
    command = [sys.executable, *(["-m", "pipeline.tools.plain"] if plain else []), f"stages/{stage}.py", *args]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"error: {' '.join(command[1:])} failed:\n{out.stderr[-3000:]}")
    return stage_summary(stage, out.stdout)


def stage_summary(stage: str, stdout: str) -> dict:
    """A stage's summary line (`[stage] done: k=v, ...`) in its output, as a dict of numbers."""
    line = next(line for line in stdout.splitlines() if line.startswith(f"[{stage}] done:"))
    summary = {}
    for part in line.split("done:", 1)[1].split(", "):
        key, _, value = part.strip().partition("=")
        try:
            summary[key] = float(value)
        except ValueError:
            pass
    return summary


def side_by_side(pairs: list[tuple[dict, dict]], images: int) -> dict:
    """Figures of alternated (Ray Train, plain) runs of the same `images`: medians per mode, and
    the ratio as the median over the pairs of each pair's own ratio. A pair's two runs are a
    minute or two apart, so a drift in the machine's speed over the benchmark (by a third within
    one session on the machines this project is built on) cancels within each pair."""
    figures = {mode: {"images_per_s": statistics.median(images / r["loop_s"] for r in rs),
                      "data_s": statistics.median(r["data_s"] for r in rs),
                      "wall_s": statistics.median(r["wall_s"] for r in rs),
                      "peak_rss_mb": max(max(r["peak_rss_mb"], r["worker_peak_rss_mb"]) for r in rs)}
               for mode, rs in (("ray", [ray for ray, _ in pairs]), ("plain", [plain for _, plain in pairs]))}
    figures["pair_ratios"] = [plain["loop_s"] / ray["loop_s"] for ray, plain in pairs]
    figures["ratio"] = statistics.median(figures["pair_ratios"])
    return figures


def training_figures(params, steps: int, repeats: int, env: dict) -> dict:
    """`steps` steps of each training stage in its Ray Train job and in a plain process,
    `repeats` alternated pairs (`side_by_side`)."""
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage, (section, args) in training_commands(Path(tmp)).items():
            if stage == "encoder_init" and params.encoder.init != "densecl":
                continue  # nothing trains: the shipped stand-in, a file or random weights
            common = short_run(args, section, steps, Path(tmp))
            pairs = []
            for i in range(repeats):
                # Ray first, then plain first: neither mode always gets the later (or earlier) slot.
                order = ("ray", "plain") if i % 2 == 0 else ("plain", "ray")
                runs = {mode: run_stage(stage, common, env, plain=mode == "plain")
                        for mode in order}
                pairs.append((runs["ray"], runs["plain"]))
            images = steps * images_per_step(params, section)
            figures = side_by_side(pairs, images)
            result[stage] = figures
            print(f"  {stage}: Ray {figures['ray']['images_per_s']:.0f} images/s, plain "
                  f"{figures['plain']['images_per_s']:.0f}, ratio {figures['ratio']:.2f} (pairs "
                  f"{', '.join(f'{r:.2f}' for r in figures['pair_ratios'])})", flush=True)
            if stage == "teacher_finetune":  # the same global batch split over 2 workers (DDP over gloo)
                cores = params.ray.cpus_per_worker
                split = run_stage(stage, [*common, "--set", "ray.num_workers=2", "--set",
                                          f"ray.cpus_per_worker={max(1, cores // 2)}"], env)
                figures["two_workers_images_per_s"] = images / split["loop_s"]
    return result


def thread_figures(params, steps: int, env: dict) -> dict[str, float]:
    """The teacher's plain loop with 1, cpus_per_worker and 2 × cpus_per_worker torch threads."""
    cores = params.ray.cpus_per_worker
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        section, args = training_commands(Path(tmp))["teacher_finetune"]
        for threads in sorted({1, cores, 2 * cores}):
            summary = run_stage("teacher_finetune", [*short_run(args, section, steps, Path(tmp)),
                                                     "--set", f"ray.cpus_per_worker={threads}"], env, plain=True)
            result[str(threads)] = steps * images_per_step(params, section) / summary["loop_s"]
    return result


# ------------------------------------------------------------------ 4. batch inference

def _drain(rows) -> float:
    """Consume a stream of rows; return the seconds until the first one arrived."""
    started, first = time.perf_counter(), None
    for _ in rows:
        first = first or time.perf_counter()
    return (first or time.perf_counter()) - started


class TorchOnly:
    """The floor under a batch-inference stage's start: an actor that imports what every model
    replica imports first and passes each batch on as it came."""

    def __init__(self):
        import torch  # noqa: F401

    def __call__(self, batch: dict) -> dict:
        return batch


def inference_figures(params) -> dict:
    """Images/s of the two batch-inference stages' work (predict and PNG-encode each row): a
    plain in-process loop at cpus_per_worker threads, then the Ray Data pipeline with 1 actor
    of that many threads and with 2 actors of half as many, start-up included, and the seconds
    until each pipeline's first row (its start-up: actors, imports, model build, planning);
    the same for the floor under it, a pipeline whose one actor only imports torch (`TorchOnly`).
    Each on a fresh local Ray of its own."""
    from dataclasses import replace

    import ray
    import torch

    from pipeline.data.manifest import read_manifest
    from pipeline.infer.batch import local_predictions, pseudo_label_rows, ray_map, ray_predictions
    from pipeline.models.checkpoints import load_segmenter
    from pipeline.runtime.ray_session import init_ray

    p = _paths()
    prepared = Path(p["prepared"])
    manifest = read_manifest(prepared)
    nets = {name: load_segmenter(Path(p[name]), params.model, manifest["classes"]) for name in ("teacher", "student")}
    confusion = torch.zeros(manifest["num_classes"], manifest["num_classes"], dtype=torch.long)
    work = {"pseudo_label": ("unlabeled", ["teacher"], params.pseudo.batch_size),
            "evaluate": ("val", ["teacher", "student"], params.evaluate.batch_size)}
    threads = params.ray.cpus_per_worker
    pools = {"ray_1_actor": (1, threads), "ray_2_actors": (2, max(1, threads // 2))}
    result = {}
    for stage, (split, names, batch) in work.items():
        images, columns = manifest["counts"][split], ["id", "image", "mask"]
        models = {name: nets[name] for name in names}
        torch.set_num_threads(threads)
        started = time.perf_counter()
        _drain(pseudo_label_rows(local_predictions(models, prepared / split, columns, batch, params.pseudo.flip_tta,
                                                   "plain loop"), names[0], confusion))
        figures = {"images": images, "plain": images / (time.perf_counter() - started)}
        for label, (actors, actor_threads) in pools.items():
            ray_cfg = replace(params.ray, cpus_per_worker=actor_threads, inference_actors=actors)
            init_ray(ray_cfg)
            started = time.perf_counter()
            with ray_predictions({name: net.state_dict() for name, net in models.items()}, params.model,
                                 manifest["num_classes"], prepared / split, columns, batch, params.pseudo.flip_tta,
                                 ray_cfg) as predictions:
                first_row_s = _drain(pseudo_label_rows(predictions, names[0], confusion))
            elapsed = time.perf_counter() - started
            figures[label], figures[f"{label}_first_row_s"] = images / elapsed, first_row_s
            # Once running: the rows after the first batch over the time after it (start-up left out;
            # with one actor the batches come one after another, so this is its steady rate).
            figures[f"{label}_after_start"] = max(0, images - batch) / max(elapsed - first_row_s, 1e-9)
            ray.shutdown()  # the next pool size gets a fresh local Ray of its own size
        ray_cfg = replace(params.ray, inference_actors=1)
        init_ray(ray_cfg)
        with ray_map(TorchOnly, {}, prepared / split, columns, batch, ray_cfg) as batches:
            figures["floor_first_row_s"] = _drain(batches)
        ray.shutdown()
        figures["ratio"] = figures["ray_1_actor"] / figures["plain"]
        result[stage] = figures
        print(f"  {stage}: plain {figures['plain']:.0f} images/s, Ray Data 1 actor {figures['ray_1_actor']:.0f} "
              f"({figures['ratio']:.2f}x), 2 actors {figures['ray_2_actors']:.0f}", flush=True)
    return result


# ------------------------------- 5. a stage's overhead: the floor under it, the processes behind it

def _train_nothing(config: dict) -> None:
    """The train function of the empty job: what a stage's job costs before its own work."""


def empty_job(ray_cfg) -> None:
    """One Ray Train job with a training stage's settings (`init_ray`, `train.launch.job_configs`)
    whose workers train nothing; prints its seconds from this process's start to the result,
    as a stage prints its summary."""
    from pipeline.orchestrate.stage_run import process_started_at
    from pipeline.runtime.ray_session import init_ray
    from pipeline.train.launch import job_configs, run_storage

    started_at = process_started_at()
    init_ray(ray_cfg)
    from ray.train.torch import TorchTrainer

    result = TorchTrainer(_train_nothing, **job_configs(ray_cfg, f"empty-job-{os.getpid()}-{time.time_ns()}",
                                                            run_storage(ray_cfg))).fit()
    wall_s = time.time() - started_at
    result.filesystem.delete_dir(result.path)
    print(f"[empty_job] done: wall_s={wall_s:.2f}", flush=True)


def empty_job_figures(repeats: int, env: dict) -> list[float]:
    """`empty_job`'s seconds in `repeats` fresh processes on the Ray of `env`, as a stage's."""
    seconds = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-m", "pipeline.tools.bench", "empty-job"], capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"error: python -m pipeline.tools.bench empty-job failed:\n{out.stderr[-3000:]}")
        seconds.append(stage_summary("empty_job", out.stdout)["wall_s"])
    return seconds


def _process_name(argv: list[str], name: str) -> str:
    """`ray::TrainController` for Ray's processes (their title), else the program, and for Python
    the file name of its first argument (`python log_monitor.py`)."""
    if argv and argv[0].startswith("ray::"):
        return argv[0].split()[0]
    if not argv:
        return name
    program = Path(argv[0]).name
    if not program.startswith("python"):
        return program
    script = [arg for arg in argv[1:] if arg != "-u"][:1]  # Ray's monitors run as `python -u <script>`
    return " ".join([program, *(Path(arg).name for arg in script)])


def _is_ray(argv: list[str], ray_package: str) -> bool:
    """A Ray worker or actor (its title) or one of Ray's services (a file of the package's folder)."""
    return any(arg.startswith("ray::") or ray_package in arg for arg in argv)


def process_timeline(command: list[str], env: dict | None = None, interval: float = 0.2) -> tuple[list[dict], str]:
    """Run `command`; every process that appeared meanwhile (Ray names its workers and actors
    in the process title), and every Ray process already running (its services, its detached
    actors; `started_s` None): when it started, in seconds from the command's start, its CPU
    seconds at the last look and all its looks (`samples`: seconds, CPU seconds), by start.
    The looks themselves cost CPU beside the command, so this process is a row too. Also
    returns the command's output."""
    import psutil

    ray_package = os.path.join(importlib.util.find_spec("ray").submodule_search_locations[0], "")
    before = {proc.pid for proc in psutil.process_iter()}
    seen: dict[int, dict] = {}
    skipped: set[int] = set()
    with tempfile.TemporaryFile("w+") as output:
        child = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        try:
            origin = psutil.Process(child.pid).create_time()
        except psutil.Error:  # already gone
            origin = time.time()
        looks = [(time.time() - origin, time.process_time())]
        while child.poll() is None:
            for proc in psutil.process_iter():
                if proc.pid in skipped:
                    continue
                try:
                    with proc.oneshot():
                        argv, cpu = proc.cmdline(), proc.cpu_times()  # Ray titles a worker once it has a role
                        if proc.pid not in seen:
                            if proc.pid in before and not _is_ray(argv, ray_package):
                                skipped.add(proc.pid)
                                continue
                            seen[proc.pid] = {"samples": [],
                                              "started_s": None if proc.pid in before else proc.create_time() - origin}
                        name = proc.name()
                except psutil.Error:  # gone between the listing and the look
                    continue
                row = seen[proc.pid]
                if argv or "name" not in row:  # an exiting process has no command line left
                    row["name"] = _process_name(argv, name)
                row["cpu_s"] = cpu.user + cpu.system
                row["samples"].append((time.time() - origin, row["cpu_s"]))
            looks.append((time.time() - origin, time.process_time()))
            time.sleep(interval)
        output.seek(0)
        text = output.read()
    if child.returncode:
        sys.exit(f"error: {' '.join(command)} failed with exit code {child.returncode}:\n{text[-3000:]}")
    rows = [{"name": "the looks (this benchmark)", "started_s": None, "samples": looks, "cpu_s": looks[-1][1]},
            *seen.values()]
    return sorted(rows, key=lambda row: (row["started_s"] is not None, row["started_s"] or 0.0)), text


def cpu_between(samples: list[tuple[float, float]], start: float, end: float) -> float:
    """CPU seconds a process spent from `start` to `end` (seconds), by its last looks before each;
    a process first seen after `start` counts from zero there (it started after it)."""
    def at(moment: float) -> float:
        return max((cpu for when, cpu in samples if when <= moment), default=0.0)

    return at(end) - at(start)


def process_figures(params, steps: int) -> str:
    """The processes a short teacher stage starts on the shared local Ray and the Ray processes
    already running: when each started, its CPU seconds during the stage and its share of a core
    during the stage's training loop, as a table."""
    from pipeline.runtime.local_ray import shared_ray

    with tempfile.TemporaryDirectory() as tmp, shared_ray(params.ray) as env:
        env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/bench.db"}
        section, args = training_commands(Path(tmp))["teacher_finetune"]
        stage_args = short_run(args, section, steps, Path(tmp))
        run_stage("teacher_finetune", stage_args, env)  # the first job on a new Ray starts its shared actors
        rows, output = process_timeline([sys.executable, "stages/teacher_finetune.py", *stage_args], env)
    summary = stage_summary("teacher_finetune", output)
    # The loop's window, from the stage's own phases (they count from its process start, as the rows do).
    loop_start = sum(summary[key] for key in ("startup_s", "ray_connect_s", "job_start_s", "worker_setup_s"))
    loop_s = summary["loop_s"]
    lines = [f"{'started s':>10}{'CPU s':>8}{'in loop':>9}  process (teacher_finetune, {steps} steps; "
             f"'in loop': % of one core over its {loop_s:.1f} s loop)"]
    for row in rows:
        share = 100 * cpu_between(row["samples"], loop_start, loop_start + loop_s) / loop_s
        running = row["started_s"] is None  # then its CPU during the stage, not over its whole life
        during = cpu_between(row["samples"], row["samples"][0][0] if running else -math.inf, math.inf)
        if during >= 0.05 or share >= 0.2:
            lines.append(f"{'before' if running else format(row['started_s'], '.1f'):>10}{during:>8.1f}"
                         f"{share:>8.1f}%  {row['name']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ reporting

def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}"


def markdown(fig: dict) -> str:
    """The README's performance table, every figure from `fig` (reports/bench.json)."""
    t = TARGETS
    ok = lambda good: "met" if good else "**missed**"  # noqa: E731
    commit, dirty = fig["commit"].removesuffix("-dirty"), fig["commit"].endswith("-dirty")
    lines = [f"Measured {fig['date']} at commit `{commit[:10]}`{' with uncommitted changes' if dirty else ''} on "
             f"{fig['machine']} by `make bench` (`reports/bench.json`).", "",
             "| stage | wall s | " + " | ".join(STAGE_COLUMNS.values()) + " | peak MiB |",
             "|---|" + "---:|" * (len(STAGE_COLUMNS) + 2)]
    for stage in STAGES:
        m = fig["pipeline"]["stages"].get(stage, {})
        cells = " | ".join(f"{m[key]:.1f}" if key in m else "–"
                           for key in ("wall_s", *STAGE_COLUMNS))
        peak = max(m.get("peak_rss_mb", 0.0), m.get("worker_peak_rss_mb", 0.0))
        lines.append(f"| {stage} | {cells} | {peak:.0f} |")
    overheads = [m["overhead_s"] for m in fig["pipeline"]["stages"].values() if "overhead_s" in m]
    floor = statistics.median(fig["empty_job_s"])
    above = statistics.median(overheads) - floor if overheads else 0.0
    outside = fig["pipeline"]["pipeline_s"] - sum(m.get("wall_s", 0.0) for m in fig["pipeline"]["stages"].values())
    lines += ["", "| figure | measured | target | |", "|---|---:|---:|---|",
              f"| whole default pipeline (`pipeline.run --force`) | {fig['pipeline']['pipeline_s']:.0f} s | "
              f"≤ {t['pipeline_s']:.0f} s | {ok(fig['pipeline']['pipeline_s'] <= t['pipeline_s'])} |",
              *([f"| the default pipeline of `{fig['pipeline']['against']['revision']}` the same way, right after "
                 f"(a worktree of that commit) | {fig['pipeline']['against']['pipeline_s']:.0f} s; this one takes "
                 f"{fig['pipeline']['pipeline_s'] / fig['pipeline']['against']['pipeline_s']:.2f}× its time | | |"]
                if "against" in fig["pipeline"] else []),
              f"| of it, outside every stage's own wall time (DVC, `pipeline.run`'s `dvc stage list` and MLflow "
              f"parent run, each stage process's exit) | {outside:.0f} s | | |",
              f"| no-op `dvc repro` | {fig['pipeline']['noop_repro_s']:.1f} s | ≤ {t['noop_repro_s']:.0f} s | "
              f"{ok(fig['pipeline']['noop_repro_s'] <= t['noop_repro_s'])} |",
              *([f"| the `smoke` preset's whole pipeline, every stage run (`python -m pipeline.run --force` in a "
                 f"worktree of this commit) | {fig['pipeline']['smoke_s']:.0f} s | ≤ {t['smoke_s']:.0f} s | "
                 f"{ok(fig['pipeline']['smoke_s'] <= t['smoke_s'])} |"] if "smoke_s" in fig["pipeline"] else []),
              f"| overhead per training stage above the floor below (median over the {len(overheads)} training "
              f"stages; each: {', '.join(f'{o - floor:.1f}' for o in overheads)}) | {above:.1f} s | "
              f"≤ {t['overhead_above_floor_s']:.0f} s | {ok(above <= t['overhead_above_floor_s'])} |",
              f"| the floor: a Ray Train job that trains nothing, with the stages' settings (process start to its "
              f"result; median of {len(fig['empty_job_s'])} runs) | {floor:.1f} s "
              f"({min(fig['empty_job_s']):.1f}–{max(fig['empty_job_s']):.1f}) | | |"]
    runs = f"{fig['training_steps']} steps, {fig['training_repeats']} alternated pairs, " if "training_steps" in fig else ""
    for stage, f in fig["training"].items():
        pairs = f.get("pair_ratios", [])
        spread = f" (pairs {min(pairs):.2f}–{max(pairs):.2f})" if len(pairs) > 1 else ""
        lines.append(f"| {stage}: Ray Train / plain loop ({runs}images/s; ratio: median over the pairs) | "
                     f"{f['ray']['images_per_s']:.0f} / {f['plain']['images_per_s']:.0f}; {f['ratio']:.3f}{spread} | "
                     f"≥ {t['training_ratio']} | {ok(f['ratio'] >= t['training_ratio'])} |")
    for stage, f in fig["training"].items():
        lines.append(f"| {stage}: data into memory, the Ray Train worker (while it imports the models) / the plain loop | "
                     f"{f['ray']['data_s']:.2f} s / {f['plain']['data_s']:.2f} s | | |")
    for stage, f in fig["inference"].items():
        lines.append(f"| {stage} ({f['images']} images): Ray Data 1 actor / plain loop, images/s | "
                     f"{f['ray_1_actor']:.0f} / {f['plain']:.0f} = {f['ratio']:.2f} (first row after "
                     f"{f['ray_1_actor_first_row_s']:.1f} s; after it {f['ray_1_actor_after_start']:.0f} images/s) | ≥ {t['inference_ratio']} | "
                     f"{ok(f['ratio'] >= t['inference_ratio'])} |")
        lines.append(f"| {stage}: 2 actors × half the threads, images/s | {f['ray_2_actors']:.0f} (first row after "
                     f"{f['ray_2_actors_first_row_s']:.1f} s) | | |")
        if "floor_first_row_s" in f:
            above = f["ray_1_actor_first_row_s"] - f["floor_first_row_s"]
            lines.append(f"| {stage}: first row (1 actor) above a Ray Data job of one actor that imports torch and "
                         f"passes its batches on (first row after {f['floor_first_row_s']:.1f} s) | {above:.1f} s | "
                         f"≤ {t['first_row_above_floor_s']:.0f} s | {ok(above <= t['first_row_above_floor_s'])} |")
    two = fig["training"].get("teacher_finetune", {}).get("two_workers_images_per_s")
    if two:
        one = fig["training"]["teacher_finetune"]["ray"]["images_per_s"]
        lines.append(f"| teacher_finetune: 2 workers × half the threads / 1 worker, images/s | {two:.0f} / {one:.0f} = "
                     f"{two / one:.2f} | | |")
    threads = ", ".join(f"{n} → {v:.0f}" for n, v in fig["threads"].items())
    lines.append(f"| teacher plain loop, torch threads → images/s | {threads} | | |")
    return "\n".join(lines)


def write_readme(fig: dict | None, gpu_fig: dict | None = None, readme: Path = Path("README.md")) -> None:
    """The tables of the CPU benchmark and of its GPU mode into their README blocks, each
    where its figures exist."""
    from pipeline.data.atomic import write_text_atomic
    from pipeline.tools import gpu_bench
    from pipeline.tools.readme_block import replace_block

    text = readme.read_text()
    if fig is not None:
        text = replace_block(text, README_BEGIN, README_END, markdown(fig), readme)
    if gpu_fig is not None:
        text = replace_block(text, GPU_README_BEGIN, GPU_README_END, gpu_bench.markdown(gpu_fig), readme)
    write_text_atomic(readme, text)


def log_to_mlflow(params, fig: dict, path: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(params.mlflow, Path.cwd()))
    mlflow.set_experiment(params.mlflow.experiment)
    flat = {"pipeline_s": fig["pipeline"]["pipeline_s"], "noop_repro_s": fig["pipeline"]["noop_repro_s"],
            "smoke_pipeline_s": fig["pipeline"]["smoke_s"], "empty_job_s": statistics.median(fig["empty_job_s"])}
    flat |= {f"{stage}.train_ratio": f["ratio"] for stage, f in fig["training"].items()}
    flat |= {f"{stage}.inference_ratio": f["ratio"] for stage, f in fig["inference"].items()}
    with mlflow.start_run(run_name="bench", tags={"git.commit": fig["commit"], "bench": "true"}):
        mlflow.log_metrics(flat)
        mlflow.log_artifact(str(path))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu"]:  # its own options; it needs neither Ray nor MLflow
        from pipeline.tools import gpu_bench

        gpu_bench.main(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["readme", "processes", "empty-job"],
                        help="readme: write reports/bench.json's (and reports/gpu_bench.json's) table into README.md; "
                             "processes: list the processes one short teacher stage starts (Ray's workers and actors) "
                             "and their CPU seconds, and each Ray process's share of a core during its loop; "
                             "empty-job: the seconds of one Ray Train job with the stages' settings that trains "
                             "nothing (on RAY_ADDRESS's Ray, else a new local one). "
                             "`python -m pipeline.tools.bench gpu …` is the GPU mode (`gpu --help`), with options of its own")
    parser.add_argument("--report", action="store_true", help="only print the latest execution's per-stage table")
    parser.add_argument("--steps", type=int, default=200, help="training steps per side-by-side run (default 200)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternated pairs of runs (Ray Train, plain) per training stage (default 3)")
    parser.add_argument("--json", type=Path, default=BENCH_JSON, help=f"where to write the figures (default {BENCH_JSON})")
    parser.add_argument("--against", metavar="REVISION",
                        help="also time that git revision's default pipeline (e.g. an earlier default), right after this one")
    args = parser.parse_args(argv)
    if args.command == "readme":
        from pipeline.tools.gpu_bench import GPU_JSON

        if not args.json.is_file() and not GPU_JSON.is_file():
            sys.exit(f"error: neither {args.json} nor {GPU_JSON} found; run `make bench` or `python -m pipeline.tools.bench gpu` first")
        try:
            write_readme(*(json.loads(path.read_text()) if path.is_file() else None for path in (args.json, GPU_JSON)))
        except ConfigError as err:
            sys.exit(f"error: {err}")
        return
    params = load_params()
    if args.command == "processes":
        print(process_figures(params, args.steps))
        return
    if args.command == "empty-job":
        empty_job(params.ray)
        return
    if args.report:
        print(stage_table(latest_stage_runs(resolve_tracking_uri(params.mlflow, Path.cwd()), params.mlflow.experiment)))
        return
    from pipeline.runtime.local_ray import shared_ray

    if args.against:
        resolve_commit(args.against, f"--against {args.against}")
    fig = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(Path.cwd()), "machine": machine()}
    print("the whole pipeline, then a no-op repro", flush=True)
    fig["pipeline"] = pipeline_figures(args.against)
    print(stage_table(fig["pipeline"]["stages"]), flush=True)
    with tempfile.TemporaryDirectory() as tracking, shared_ray(params.ray) as env:
        env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tracking}/bench.db"}  # side-by-side runs stay out of the experiment
        print(f"training, {args.steps} steps: Ray Train job vs plain loop", flush=True)
        fig["training_steps"], fig["training_repeats"] = args.steps, args.repeats
        fig["training"] = training_figures(params, args.steps, args.repeats, env)
        fig["threads"] = thread_figures(params, args.steps, env)
        print("a Ray Train job that trains nothing", flush=True)
        fig["empty_job_s"] = empty_job_figures(args.repeats, env)
    print("batch inference: plain loop vs Ray Data", flush=True)
    fig["inference"] = inference_figures(params)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from pipeline.data.atomic import write_text_atomic

    write_text_atomic(args.json, json.dumps(fig, indent=2) + "\n")
    log_to_mlflow(params, fig, args.json)
    print(markdown(fig))


if __name__ == "__main__":
    main()
