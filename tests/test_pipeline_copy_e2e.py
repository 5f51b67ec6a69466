"""End to end, on a private copy of test_pipeline_e2e.py's first run (the whole DAG on a folder
of the user's own images): the tests that only read that run, or run a stage or a study beside
it. They run on the other pytest worker while test_pipeline_e2e.py's own tests change and rerun
its workspace: a failure inside a Ray Data batch or a training step (which must end the stage at
once with exit 1), the plain baseline, the stand-in encoder's stage, two Ray workers, and a small
label-efficiency study. The copy logs to MLflow in a file of its own."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import session_folder, wait_until
from mlflow import MlflowClient
from test_pipeline_e2e import (
    CLASSES,
    SHARED_FIRST_RUN,
    edit_params,
    encoder_of,
    first_run,
    ran_stages,
    repo_env,
    run,
    same_weights,
    stage_output,
)

from pipeline.tools.study import README_BEGIN, README_END

pytestmark = pytest.mark.slow

FIRST_RUN_WAIT_S = 2400  # the first run with every other file's tests beside it: ~5 minutes here


def tracking_uri(repo: Path) -> str:
    return f"sqlite:///{repo.parent / 'mlflow.db'}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory, request) -> Path:
    """A copy of the first run that test_pipeline_e2e.py publishes, once it is there; where that
    file does not run in this session, a first run of its own."""
    base = tmp_path_factory.mktemp("e2e-copy")
    shared = session_folder(tmp_path_factory) / SHARED_FIRST_RUN
    if any(item.path.name == "test_pipeline_e2e.py" for item in request.session.items):
        failed = shared.with_suffix(".failed")
        assert wait_until(lambda: shared.exists() or failed.exists(), FIRST_RUN_WAIT_S, every=1), "no first run"
        if failed.exists():
            pytest.fail("test_pipeline_e2e.py's first run failed (its setup error says why)")
        repo = base / "repo"
        shutil.copytree(shared, repo, symlinks=True)
    else:
        repo = first_run(base, tracking_uri(base / "repo"))
    edit_params(repo / "params.yaml", "mlflow", "tracking_uri", tracking_uri(repo))
    return repo


EXIT_WITHIN_S = 90  # a failing stage's whole run, Ray's start included; a hang would run to the timeout


def _stage(repo: Path, script: str, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run([sys.executable, f"stages/{script}.py", *args], cwd=repo, capture_output=True, text=True,
                            env={**repo_env(repo), **(env or {})}, timeout=300)
    return result, time.monotonic() - started


def _corrupt_copy(split: Path, out: Path, column: str, value) -> Path:
    """The split's rows with the first row's `column` replaced by `value`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(split)
    values = table.column(column).to_pylist()
    values[0] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, table.schema.field(column).type))
    out.mkdir(parents=True)
    pq.write_table(table, out / "part-00000.parquet")
    return out


def _assert_failed_promptly(result: subprocess.CompletedProcess, seconds: float, out: Path,
                            last_line: re.Pattern | None = None) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    if last_line is not None:  # our error, raised inside a Ray actor, still one line at the end
        assert last_line.match(result.stderr.splitlines()[-1]), result.stderr[-3000:]
    assert seconds < EXIT_WITHIN_S, f"took {seconds:.0f} s:\n{result.stderr[-3000:]}"
    assert "Timeout (" not in result.stderr  # ended by its own error path, not by the exit watchdog
    assert not out.exists()  # nothing half-written


NOT_A_PNG = re.compile(r"^error: image '\w+': its stored bytes are not a PNG \(\w+\); rerun the stage that wrote the split$")


def test_a_failure_inside_a_pseudo_label_batch_ends_the_stage(repo, tmp_path):
    broken = _corrupt_copy(repo / "data/prepared/unlabeled", tmp_path / "unlabeled", "image", b"not a png")
    result, seconds = _stage(repo, "pseudo_label", "--prepared", "data/prepared", "--teacher",
                             "models/rounds/teacher.pt", "--unlabeled", str(broken), "--out", str(tmp_path / "pseudo"))
    _assert_failed_promptly(result, seconds, tmp_path / "pseudo", NOT_A_PNG)


def test_a_failure_inside_an_evaluate_batch_ends_the_stage(repo, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(repo / "data/prepared", prepared, ignore=shutil.ignore_patterns("val"))
    _corrupt_copy(repo / "data/prepared/val", prepared / "val", "image", b"not a png")
    result, seconds = _stage(repo, "evaluate", "--prepared", str(prepared), "--rounds", "models/rounds",
                             "--student", str(tmp_path / "student.pt"), "--metrics", str(tmp_path / "metrics.json"),
                             "--per-class", str(tmp_path / "per_class.csv"), "--figures", str(tmp_path / "figures"))
    _assert_failed_promptly(result, seconds, tmp_path / "metrics.json", NOT_A_PNG)


def test_a_failure_inside_a_training_step_ends_the_stage(repo, tmp_path):
    """A mask value beyond the classes (as a corrupted shard could hold) fails the loss inside
    the worker's first step."""
    import pyarrow.parquet as pq

    from pipeline.data.png import decode_png, encode_png

    first = pq.read_table(repo / "data/prepared/labeled").column("mask")[0].as_py()
    bad_mask = decode_png(first).copy()
    bad_mask[:] = len(CLASSES) + 4
    labeled = _corrupt_copy(repo / "data/prepared/labeled", tmp_path / "labeled", "mask", encode_png(bad_mask))
    result, seconds = _stage(repo, "teacher_finetune", "--prepared", "data/prepared", "--labeled", str(labeled),
                             "--pretrained", "models/pretrained.pt", "--out", str(tmp_path / "teacher.pt"),
                             "--set", "teacher.steps_per_epoch=20", "--set", "teacher.epochs=1")
    _assert_failed_promptly(result, seconds, tmp_path / "teacher.pt")


def test_the_benchmarks_plain_baseline_trains_the_teachers_very_weights(repo, tmp_path):
    """`python -m pipeline.tools.plain` runs a stage's script with its Ray Train job replaced by a
    loop in that one process: the same recipe, data, seeds and steps give the same teacher."""
    out = run([sys.executable, "-m", "pipeline.tools.plain", "stages/teacher_finetune.py", "--prepared",
               "data/prepared", "--pretrained", "models/pretrained.pt", "--out", str(tmp_path / "teacher.pt")], repo).stdout
    summary = next(line for line in out.splitlines() if line.startswith("[teacher_finetune] done:"))
    assert "loop_s=" in summary and "job_start_s" not in summary  # trained here, no Ray Train job
    assert same_weights(torch.load(tmp_path / "teacher.pt", weights_only=True)["state_dict"],
                        torch.load(repo / "models/rounds/teacher.pt", weights_only=True)["state_dict"])


def test_the_stand_in_stage_trains_a_letters_classifier_into_an_encoder(repo, tmp_path):
    out = tmp_path / "standin" / "tiny.pt"
    result = run([sys.executable, "stages/standin_encoder.py", "--set", "encoder.epochs=2",
                  "--set", "encoder.steps_per_epoch=2", "--set", "encoder.batch_size=8", "--letters", "40",
                  "--size", "32", "--out", str(out), "--curves", str(tmp_path / "curves.csv")], repo, timeout=600)
    assert "letters=40" in result.stdout and "loop_s=" in result.stdout
    trained, shipped = encoder_of(out), encoder_of(repo / "encoders/weights/tiny.pt")
    assert trained.keys() == shipped.keys() and not same_weights(trained, shipped)
    assert len((tmp_path / "curves.csv").read_text().splitlines()) == 3  # a header and two epochs
    assert [p.name for p in out.parent.iterdir()] == ["tiny.pt"]  # its letters' shards are gone


def teacher_on_workers(repo: Path, out: Path, workers: int, cpus: int, env: dict | None = None) -> str:
    """The teacher stage's script as DVC runs it, on `workers` Ray workers, into `out`: the
    workspace's outputs and lock stay as they are, so nothing downstream has to run again."""
    result = run([sys.executable, "stages/teacher_finetune.py", "--prepared", "data/prepared",
                  "--pretrained", "models/pretrained.pt", "--out", str(out), "--set", f"ray.num_workers={workers}",
                  "--set", f"ray.cpus_per_worker={cpus}"], repo, env=env, timeout=600)
    assert out.is_file()
    return result.stdout + result.stderr


def test_two_ray_workers_train_and_export_one_model(repo, tmp_path):
    out = teacher_on_workers(repo, tmp_path / "teacher.pt", 2, 1)
    assert "world_size=2" in out
    client = MlflowClient(tracking_uri(repo))
    latest = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`dvc.stage` = 'teacher_finetune'", order_by=["attributes.start_time DESC"])[0]
    assert latest.data.metrics["world_size"] == 2
    assert latest.data.metrics["replica_weight_spread"] == 0.0  # DDP kept the two copies identical


def test_a_one_seed_study_runs_the_pipelines_stages_reports_and_resumes_from_its_lock(repo, tmp_path):
    """Every kind of study stage once (averaging over seeds is unit-tested in test_study), the
    report and its README table, then a second run that finds every point recorded. The last
    test here: it leaves the copy's params as the study's."""
    params_file = repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["study"] = {**params["study"], "fractions": [0.5], "seeds": [0], "sigmas": [0.2], "dep_sigma": 0.2,
                       "ddep_sigma": 0.2, "sweep_fraction": 0.5, "teacher_steps": [2], "teacher_epochs": 1,
                       # The pretraining-length check is decoder_pretrain with --curves, as the pipeline's own
                       # decoder_pretrain runs it: test_study checks its plan and its table.
                       "ablation_fractions": [0.5], "pretrain_fractions": [],
                       # the other rows are the same stages with other switches, and the second round's
                       # (dense contrast's) the same two once more on the first round's student:
                       # test_study checks their plan and that DVC resolves them
                       "ablation_rows": ["copy-paste"],
                       "ablation_student_epochs": 1, "student_steps_per_epoch": 2,  # the study sets its students' length
                       "control": None,  # a control's stages are the same ones: test_study checks they resolve
                       "tuning_seeds": []}  # so are the recipe choice's, on the tuning split test_prepare checks
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([sys.executable, "-m", "pipeline.runtime.local_ray", "--", sys.executable, "-m", "pipeline.tools.study"], repo,
              timeout=1800).stdout
    ran = ran_stages(out)
    # A line before each point it trains; from the second on, the time left at the run's pace.
    assert re.search(r"^study: teacher@\S+ \(0 of (\d+) points recorded; \1 to train\)$", out, re.MULTILINE)
    assert re.search(r"^study: \S+ \(1 of \d+ points recorded; \d+ to train, about 0 h \d\d min at this", out, re.MULTILINE)
    assert len([s for s in ran if "teacher@" in s]) == 4  # the four initialisations
    assert len([s for s in ran if "student@" in s]) == 1
    assert {"study/dvc.yaml:encoder_random", "study/dvc.yaml:report"} <= ran
    assert "encoder_init" not in ran  # the supervised encoder is the main pipeline's, already built
    # Decoder pretraining in each mode: DeP trains the (random) encoder too, DDeP the decoder
    # alone, and `none` trains nothing, its encoder passed on as it came.
    encoders = {"random": encoder_of(repo / "study/models/encoder-random.pt"), "supervised": encoder_of(repo / "models/encoder.pt")}
    for key, encoder, trained, encoder_trained in (("random", "random", False, False), ("supervised", "supervised", False, False),
                                                   ("dep-s0p2", "random", True, True), ("ddep-s0p2", "supervised", True, False)):
        said = stage_output(out, f"study/dvc.yaml:pretrain@{key}")
        assert ("epoch 1/" in said) == trained, said  # the loop's own epoch line
        pretrained = encoder_of(repo / f"study/models/pretrained-{key}.pt")
        assert same_weights(pretrained, encoders[encoder]) != encoder_trained, key
    # At the pipeline's own σ and settings, the study's DDeP pretraining is the pipeline's, to the bit.
    assert same_weights(torch.load(repo / "study/models/pretrained-ddep-s0p2.pt", weights_only=True)["state_dict"],
                        torch.load(repo / "models/pretrained.pt", weights_only=True)["state_dict"])
    report = (repo / "study/report/report.md").read_text()
    for row in ("| random init |", "| supervised encoder |", "| DeP |", "| DDeP |", "| teacher (DDeP) |",
                "| + copy-paste |", "| pseudo-labels, round 1 |"):
        assert row in report
    assert "Partial" not in report and "–" not in report
    header = (repo / "study/report/figure2.csv").read_text().splitlines()[0]
    assert header.startswith("fraction,random init mean")
    assert (repo / "study/report/figure2.png").is_file() and (repo / "study/report/sigma_sweep.png").is_file()
    plots = run(["dvc", "plots", "show", "--json"], repo).stdout
    assert "label_efficiency" in plots and "sigma_sweep" in plots
    # `dvc metrics show` (what `make run` prints last) stays the pipeline's: the points' scores are the study's.
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert "reports/metrics.json" in json.dumps(shown) and "study/metrics" not in json.dumps(shown)
    run([sys.executable, "-m", "pipeline.tools.study", "readme"], repo)
    readme = (repo / "README.md").read_text()
    assert readme.split(README_BEGIN)[1].split(README_END)[0].strip() == report.strip()
    # As on a fresh clone on another machine: only the lock, the metrics and the store. Nothing
    # reruns, and the pretrainings' figures come back from the store (a pretraining with a
    # missing output would train again, and every point after it).
    for made in ("study/models", "study/figures", "study/data"):
        shutil.rmtree(repo / made)
    cache, kept = repo / ".dvc/cache/files", tmp_path / "cache"
    shutil.move(cache, kept)
    again = run([sys.executable, "-m", "pipeline.tools.study"], repo, timeout=600).stdout
    assert "Running stage" not in again
    assert list((repo / "study/figures").glob("ddep-*/*.png"))
    # The pipeline's own outputs cached again, or the next `dvc repro` would count them as changed.
    shutil.copytree(kept, cache, dirs_exist_ok=True,
                    copy_function=lambda src, dst: None if os.path.exists(dst) else shutil.copy2(src, dst))
