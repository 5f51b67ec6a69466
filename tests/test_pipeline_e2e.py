"""End to end: the real `dvc repro` of the whole DAG on the `smoke` preset, in a temp copy of
the repo, then DVC's view of a param change, the pretraining modes, a two-worker Ray job, and
a small label-efficiency study."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.study import ABLATION

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STAGES = ["prepare", "encoder_init", "decoder_pretrain", "teacher_finetune", "pseudo_label", "student_train",
          "evaluate"]
TRAINING = ["encoder_init", "decoder_pretrain", "teacher_finetune", "student_train"]
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "data", "models", "reports", "ray_results", "mlflow.db",
                                     "mlartifacts", "cache", "tmp", "__pycache__", ".pytest_cache", "dvc.lock",
                                     "metrics", "report", "figures")

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    # PYTHONPATH: the copy's own `pipeline`, for the stages and the Ray workers alike.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(cwd)}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PIPELINE_EXECUTION_ID"):
        env.pop(key, None)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh copy of this working tree, composed to the smoke preset, after one `dvc repro`."""
    repo = tmp_path_factory.mktemp("e2e") / "repo"
    shutil.copytree(ROOT, repo, ignore=COPY_IGNORE)
    run([sys.executable, "-m", "pipeline.compose", "experiment=smoke"], repo)
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "smoke"], repo)
    run(["dvc", "repro"], repo, timeout=1500)
    return repo


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def stale_stages(repo: Path) -> set[str]:
    """The stages whose own deps or params changed, as `dvc repro --dry` reports them (the
    stages below them are decided by DVC once these have run and changed their outputs)."""
    return ran_stages(run(["dvc", "repro", "--dry"], repo).stdout)


@pytest.fixture
def params_file(repo):
    path = repo / "params.yaml"
    original = path.read_text()
    yield path
    path.write_text(original)
    run(["dvc", "repro"], repo, timeout=900)  # back in sync (DVC's run cache restores what ran before)


def edit_params(path: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def encoder_of(path: Path) -> dict:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")} or state


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_output_and_the_metrics_exist(repo):
    for path in ["data/prepared/manifest.json", "models/encoder.pt", "models/pretrained.pt", "models/teacher.pt",
                 "models/student.pt", "reports/per_class_iou.csv", "reports/figures/predictions.png",
                 "reports/figures/confusion_teacher.png", "reports/decoder_pretrain/denoising_triplets.png"]:
        assert (repo / path).is_file(), path
    assert list((repo / "data/pseudo").glob("*.parquet"))
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for role in ("teacher", "student"):
        assert 0.0 <= metrics[role]["miou"] <= 1.0
        assert 0.0 <= metrics[role]["pixel_accuracy"] <= 1.0
        assert metrics[role]["per_class_iou"]
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert "teacher" in json.dumps(shown) and "miou" in json.dumps(shown)
    assert not (repo / "ray_results").exists() or not any((repo / "ray_results").iterdir())


def test_mlflow_has_one_parent_and_a_child_run_per_stage(repo):
    db = sqlite3.connect(repo / "mlflow.db")
    tags = db.execute("select run_uuid, key, value from tags").fetchall()
    by_run: dict[str, dict] = {}
    for run_id, key, value in tags:
        by_run.setdefault(run_id, {})[key] = value
    first = min((r for r, t in by_run.items() if t.get("pipeline.parent") == "true"),
                key=lambda r: db.execute("select start_time from runs where run_uuid=?", (r,)).fetchone()[0])
    children = {t["dvc.stage"]: r for r, t in by_run.items() if t.get("mlflow.parentRunId") == first}
    assert sorted(children) == sorted(STAGES)
    for stage, run_id in children.items():
        assert by_run[run_id]["git.commit"] != "unknown"
        assert by_run[run_id]["data.manifest_hash"]
        status = db.execute("select status from runs where run_uuid=?", (run_id,)).fetchone()[0]
        assert status == "FINISHED", stage
    for stage in TRAINING:
        keys = {k for (k,) in db.execute("select key from metrics where run_uuid=?", (children[stage],))}
        assert {"loss", "loop_seconds", "wall_s", "overhead_s"} <= keys, stage
        params = {k for (k,) in db.execute("select key from params where run_uuid=?", (children[stage],))}
        assert any(p.startswith("model.") for p in params)
    eval_metrics = {k for (k,) in db.execute("select key from metrics where run_uuid=?", (children["evaluate"],))}
    assert {"teacher_miou", "student_miou"} <= eval_metrics


def test_repeat_repro_runs_nothing(repo):
    out = run(["dvc", "repro"], repo).stdout
    assert "Running stage" not in out
    assert stale_stages(repo) == set()


def test_student_param_change_reruns_only_student_and_evaluate(repo, params_file):
    edit_params(params_file, "student", "lr", yaml.safe_load(params_file.read_text())["student"]["lr"] * 0.5)
    assert stale_stages(repo) == {"student_train"}
    assert ran_stages(run(["dvc", "repro"], repo, timeout=900).stdout) == {"student_train", "evaluate"}


def test_sigma_change_starts_at_decoder_pretrain(repo, params_file):
    edit_params(params_file, "decoder_pretrain", "sigma", 0.4)
    assert stale_stages(repo) == {"decoder_pretrain"}


def test_ddep_leaves_the_encoder_bit_identical(repo):
    assert same_weights(encoder_of(repo / "models/pretrained.pt"), encoder_of(repo / "models/encoder.pt"))


@pytest.mark.parametrize("mode, encoder_trains", [("dep", True), ("none", False)])
def test_dep_trains_the_encoder_and_none_trains_nothing(repo, params_file, mode, encoder_trains):
    edit_params(params_file, "decoder_pretrain", "mode", mode)
    out = run(["dvc", "repro", "--single-item", "decoder_pretrain"], repo, timeout=600)
    assert f"mode={mode}" in out.stdout
    assert ("Started training worker group" in out.stdout + out.stderr) == encoder_trains
    encoder = encoder_of(repo / "models/encoder.pt")
    assert same_weights(encoder_of(repo / "models/pretrained.pt"), encoder) != encoder_trains


def test_densecl_pretrains_the_encoder_on_the_train_images(repo, params_file):
    supervised = encoder_of(repo / "models/encoder.pt")
    edit_params(params_file, "encoder", "init", "densecl")
    out = run(["dvc", "repro", "--single-item", "encoder_init"], repo, timeout=600).stdout
    assert "init=densecl" in out and "loop_s=" in out
    densecl = encoder_of(repo / "models/encoder.pt")
    assert densecl.keys() == supervised.keys() and not same_weights(densecl, supervised)


def test_ray_and_mlflow_sections_never_invalidate_the_cache(repo, params_file):
    edit_params(params_file, "ray", "num_workers", 4)
    edit_params(params_file, "mlflow", "experiment", "elsewhere")
    assert stale_stages(repo) == set()


def test_two_ray_workers_train_and_export_one_model(repo, params_file):
    edit_params(params_file, "ray", "num_workers", 2)
    edit_params(params_file, "ray", "cpus_per_worker", 1)
    before = (repo / "models/teacher.pt").stat().st_mtime_ns
    out = run(["dvc", "repro", "--force", "--single-item", "teacher_finetune"], repo, timeout=600)
    assert "world_size=2" in out.stdout + out.stderr
    assert (repo / "models/teacher.pt").stat().st_mtime_ns > before
    db = sqlite3.connect(repo / "mlflow.db")
    latest = db.execute("select r.run_uuid from runs r join tags t on r.run_uuid = t.run_uuid "
                        "where t.key = 'dvc.stage' and t.value = 'teacher_finetune' "
                        "order by r.start_time desc limit 1").fetchone()[0]
    world = db.execute("select max(value) from metrics where run_uuid=? and key='world_size'", (latest,)).fetchone()
    assert world[0] == 2


def test_study_runs_the_pipelines_stages_and_reports(repo, params_file):
    params = yaml.safe_load(params_file.read_text())
    # One seed: averaging over seeds is unit-tested (test_study); this runs every kind of stage once.
    params["study"] = {**params["study"], "fractions": [0.5], "seeds": [0], "sigmas": [0.2], "dep_sigma": 0.2,
                       "sweep_fraction": 0.5, "teacher_steps": [2], "teacher_epochs": 1, "ablation_fractions": [0.5]}
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([sys.executable, "-m", "pipeline.cluster", "--", sys.executable, "-m", "pipeline.study"], repo,
              timeout=1500).stdout
    ran = ran_stages(out)
    assert len([s for s in ran if "teacher@" in s]) == 4  # four initialisations
    assert {"study/dvc.yaml:encoder_random", "study/dvc.yaml:report"} <= ran
    assert "encoder_init" not in ran  # the supervised encoder is the main pipeline's, already built
    report = (repo / "study/report/report.md").read_text()
    for row in ("| random init |", "| supervised encoder |", "| DeP |", "| DDeP |", "| teacher (DDeP) |",
                "| student, plain CE |", "| + dense contrast, 2 rounds |", "| pseudo-labels, round 2 |"):
        assert row in report
    assert len([s for s in ran if "student@" in s]) == len(ABLATION) + 1  # and a second round
    header = (repo / "study/report/figure2.csv").read_text().splitlines()[0]
    assert header.startswith("fraction,random init mean")
    assert (repo / "study/report/figure2.png").is_file() and (repo / "study/report/sigma_sweep.png").is_file()
    plots = run(["dvc", "plots", "show", "--json"], repo).stdout
    assert "label_efficiency" in plots and "sigma_sweep" in plots
    again = run([sys.executable, "-m", "pipeline.study"], repo, timeout=300).stdout
    assert "Running stage" not in again
