"""End to end: the real `dvc repro` of the whole DAG on the `smoke` preset, in a temp copy of
the repo, on a user's own folder of images in the README's layout (images, masks, an `unlabeled/`
folder of images only, a `val/` folder); then DVC's view of a param change, the pretraining
modes, MLflow's runs and registry, kills, interrupts and resumes, S3. The tests that only read
the first run, or run beside it, are in test_pipeline_copy_e2e.py, on a copy of it. The built-in
datasets are prepared in process (test_prepare, test_shape_scenes) and through the whole DAG by
`make run` (the acceptance checks); each benchmark format's prepared splits go through batch
inference in test_formats."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from conftest import S3Server, free_port, session_folder

from pipeline.tools.bench import PHASES
from pipeline.runtime.tracking import stage_tag

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STAGES = ["prepare", "encoder_init", "decoder_pretrain", "teacher_finetune", "pseudo_label@round1",
          "student_train@round1", "evaluate"]
# encoder_init trains nothing by default: `encoder.init: supervised` is the shipped stand-in.
TRAINING = ["decoder_pretrain", "teacher_finetune", "student_train@round1"]
CURVES = {"decoder_pretrain": "decoder_pretrain", "teacher_finetune": "teacher_finetune",
          "student_train@round1": "student_train-round1"}
TEACHER = "models/rounds/teacher.pt"
CLASSES = ("background", "disc", "square")  # three: a denoiser's head has three channels too
SIZE = 64


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = (rng.normal(0.5, 0.15, (SIZE, SIZE, 3)).clip(0, 1) * 255).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for _ in range(rng.integers(1, 4)):
        cls, (cy, cx), r = int(rng.integers(1, 3)), rng.integers(10, SIZE - 10, 2), int(rng.integers(5, 10))
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if cls == 1 else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        image[inside], mask[inside] = rng.integers(0, 256, 3), cls
    return image, mask


def draw_folder_dataset(root: Path) -> None:
    """The README's layout: 12 labeled images, 20 unlabeled ones (one a JPEG stored sideways with
    an EXIF rotation, as phones write them), 6 val images, classes.txt."""
    rng = np.random.default_rng(3)
    for sub in ("images", "masks", "unlabeled", "val/images", "val/masks"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for folder, count in (("", 12), ("val/", 6)):
        for i in range(count):
            image, mask = _scene(rng)
            Image.fromarray(image).save(root / f"{folder}images/{folder[:-1] or 'img'}{i:03d}.png")
            Image.fromarray(mask).save(root / f"{folder}masks/{folder[:-1] or 'img'}{i:03d}.png")
    for i in range(20):
        image = Image.fromarray(_scene(rng)[0])
        if i == 0:
            exif = Image.Exif()
            exif[0x0112] = 6  # Orientation: the viewer turns it 90° clockwise
            image.transpose(Image.Transpose.ROTATE_90).save(root / "unlabeled/phone.jpg", exif=exif)
        else:
            image.save(root / f"unlabeled/u{i:03d}.png")


# What a fresh clone lacks, by folder: outputs and caches, never the code (`pipeline/data`,
# `pipeline/models` share their names with the top's outputs).
_NOT_COPIED = {ROOT: {"data", "models", "reports", "ray_results", "mlflow.db", "mlartifacts", "logs", "dvc.lock"},
               ROOT / "study": {"data", "models", "metrics", "report", "figures", "store", "dvc.lock"},
               ROOT / ".dvc": {"cache", "tmp"}}


def COPY_IGNORE(folder: str, names: list[str]) -> set[str]:  # noqa: N802 (shutil.copytree's ignore)
    skipped = {".venv", ".git", "__pycache__", ".pytest_cache"} | _NOT_COPIED.get(Path(folder).resolve(), set())
    return skipped & set(names)

pytestmark = pytest.mark.slow


def repo_env(repo: Path) -> dict:
    """The project's tools first on PATH; PYTHONPATH: the copy's own `pipeline`, for the stages
    and the Ray workers alike; nothing inherited that points elsewhere."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(repo)}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PIPELINE_EXECUTION_ID"):
        env.pop(key, None)
    return env


def run(cmd: list[str], cwd: Path, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env={**repo_env(cwd), **(env or {})}, capture_output=True, text=True, **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


BUCKET = "pipeline"


@pytest.fixture(scope="module")
def s3_endpoint(s3_server) -> S3Server:
    """The S3 server with this module's bucket."""
    s3_server.client().create_bucket(Bucket=BUCKET)
    return s3_server


def s3_keys(s3: S3Server, prefix: str) -> list[str]:
    return s3.keys(BUCKET, prefix)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3_endpoint) -> str:
    """A real `mlflow server` on loopback, its artifact store in the S3 bucket and served
    through the server, so no client needs a path or credentials of its own."""
    store = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # One worker and no job runners: a 2-core machine under test load starts them too slowly
    # for uvicorn's supervisor, which then kills and restarts them in a loop.
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                               "--artifacts-destination", f"s3://{BUCKET}/mlflow"],
                              env={**os.environ, **s3_endpoint.env, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint.url,
                                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              stdout=subprocess.DEVNULL, stderr=open(store / "server.log", "w"))
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, (store / "server.log").read_text()[-2000:]
            time.sleep(1)
    yield url
    server.terminate()
    server.wait(30)


def mlflow_api(url: str, endpoint: str, body: dict | None = None) -> dict:
    """MLflow's REST API: GET with query params, or POST a JSON body."""
    if body is None:
        return json.loads(urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}", timeout=30).read())
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def search_runs(url: str, filter_string: str) -> list[dict]:
    experiment = mlflow_api(url, "experiments/get-by-name?experiment_name=label-efficient-segmentation")
    found = mlflow_api(url, "runs/search", {"experiment_ids": [experiment["experiment"]["experiment_id"]],
                                            "filter": filter_string, "max_results": 1000,
                                            "order_by": ["attributes.start_time ASC"]})
    return found.get("runs", [])


def tags_of(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params_of(run: dict) -> dict:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics_of(run: dict) -> dict:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def children_of(url: str, parent: dict) -> dict[str, dict]:
    return {tags_of(r)["dvc.stage"]: r for r in search_runs(url, f"tags.`mlflow.parentRunId` = '{parent['info']['run_id']}'")}


FIRST_RUN_LOG = "first_run.log"
# In the session's folder once the first run is done: what test_pipeline_copy_e2e.py copies.
SHARED_FIRST_RUN = "pipeline-e2e-first-run"


def first_run(base: Path, tracking_uri: str) -> Path:
    """A fresh copy of this working tree in `base` after the README's recipe on a folder dataset
    (the smoke sizes, half of the train images labeled: the unlabeled split mixes images with
    held-aside masks and `unlabeled/` images without any), logging to `tracking_uri`, after one
    `python -m pipeline.run` (dvc repro), whose output is in `FIRST_RUN_LOG` beside it."""
    draw_folder_dataset(base / "my_data")
    repo = base / "repo"
    shutil.copytree(ROOT, repo, ignore=COPY_IGNORE)
    run([sys.executable, "-m", "pipeline.compose", "dataset=folder", f"data.root={base / 'my_data'}", "experiment=smoke",
         "data.labeled_fraction=0.5", f"mlflow.tracking_uri={tracking_uri}"], repo)
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "smoke"], repo)
    result = run([sys.executable, "-m", "pipeline.run"], repo, timeout=1500)
    (base / FIRST_RUN_LOG).write_text(result.stdout + result.stderr)
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlflow_server) -> Path:
    """`first_run`, logging to a real MLflow server. A copy of it, made before any test here
    changes it, goes to the session's folder for test_pipeline_copy_e2e.py (on the other pytest
    worker); a failed run leaves a `.failed` mark there instead, so that nothing waits for it."""
    shared = session_folder(tmp_path_factory) / SHARED_FIRST_RUN
    base = tmp_path_factory.mktemp("e2e")
    try:
        repo = first_run(base, mlflow_server)
    except BaseException:
        shared.with_suffix(".failed").touch()
        raise
    staging = shared.with_name(f".{shared.name}.{os.getpid()}")
    shutil.copytree(repo, staging, symlinks=True)
    staging.rename(shared)  # whole, or not there at all
    return repo


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def stage_output(output: str, stage: str) -> str:
    """What `dvc repro` printed for `stage`: from its "Running stage" line to the next one."""
    marker = f"Running stage '{stage}'"
    assert marker in output, f"{stage} did not run:\n{output[-3000:]}"
    return output.split(marker)[1].split("Running stage '")[0]


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
    for path in ["data/prepared/manifest.json", "models/encoder.pt", "models/pretrained.pt", TEACHER,
                 "models/rounds/round1.pt", "models/student.pt", "reports/per_class_iou.csv",
                 "reports/figures/predictions.png", "reports/figures/confusion_teacher.png",
                 "reports/figures/per_class_iou.png", "reports/decoder_pretrain/denoising_triplets.png",
                 "reports/pseudo_label/round1/pseudo_labels.png"]:
        assert (repo / path).is_file(), path
    for stage in TRAINING:
        curve = (repo / f"reports/curves/{CURVES[stage]}.csv").read_text().splitlines()
        assert curve[0].startswith("epoch,") and "loss" in curve[0] and len(curve) >= 2, stage
    assert list((repo / "data/pseudo/round1").glob("*.parquet"))
    # The exported student is the last round's.
    assert (repo / "models/student.pt").read_bytes() == (repo / "models/rounds/round1.pt").read_bytes()
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for role in ("teacher", "student"):
        assert 0.0 <= metrics[role]["miou"] <= 1.0
        assert 0.0 <= metrics[role]["pixel_accuracy"] <= 1.0
        assert metrics[role]["per_class_iou"]
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert "teacher" in json.dumps(shown) and "miou" in json.dumps(shown)
    assert not (repo / "ray_results").exists() or not any((repo / "ray_results").iterdir())


def test_a_folder_with_unlabeled_and_val_runs_the_whole_dag(repo):
    output = (repo.parent / FIRST_RUN_LOG).read_text()
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert manifest["classes"] == list(CLASSES)
    assert manifest["counts"]["labeled"] == 6 and manifest["counts"]["unlabeled"] == 26 and manifest["counts"]["val"] == 6
    per_class = json.loads((repo / "reports/metrics.json").read_text())["student"]["per_class_iou"]
    assert per_class and set(per_class) <= set(CLASSES)  # the folder's own class names
    pseudo = [line for line in output.splitlines() if line.startswith("[pseudo_label@round1] done:")]
    assert pseudo and "images=26" in pseudo[0] and "pseudo_miou=" in pseudo[0]  # scored on the 6 held-aside masks
    predicted = run([sys.executable, "-m", "pipeline.predict", str(repo.parent / "my_data/val/images/val000.png"),
                     "--model", "models/student.pt", "--out", "pred"], repo)
    assert predicted.stdout.strip().endswith("val000.png") and (repo / "pred/val000.png").is_file()


def test_mlflow_has_one_parent_and_a_child_run_per_stage(repo, mlflow_server):
    parent = search_runs(mlflow_server, "tags.`pipeline.parent` = 'true'")[0]
    assert parent["info"]["status"] == "FINISHED"
    assert {"data.seed", "student.lr", "ray.num_workers"} <= set(params_of(parent))
    assert tags_of(parent)["data.manifest_hash"] and tags_of(parent)["git.commit"] != "unknown"
    assert all(tags_of(parent)[stage_tag(s)] == "ran" for s in STAGES)
    children = children_of(mlflow_server, parent)
    assert sorted(children) == sorted(STAGES)
    for stage, child in children.items():
        assert tags_of(child)["git.commit"] != "unknown" and tags_of(child)["data.manifest_hash"]
        assert child["info"]["status"] == "FINISHED", stage
    for stage in TRAINING:
        metrics = metrics_of(children[stage])
        assert {"loss", "loop_seconds", "wall_s", "overhead_s"} <= set(metrics), stage
        # The overhead, phase by phase, adds up (`make bench`'s table shows where it goes).
        assert sum(metrics[phase] for phase in PHASES) == pytest.approx(metrics["overhead_s"], abs=0.1), stage
        assert any(p.startswith("model.") for p in params_of(children[stage]))
    assert {"teacher_miou", "student_miou"} <= set(metrics_of(children["evaluate"]))
    assert {"teacher_miou", "student_miou"} <= set(metrics_of(parent))


def test_the_student_is_registered_and_champion(repo, mlflow_server, s3_endpoint):
    alias = mlflow_api(mlflow_server, "registered-models/alias?name=segmentation-student&alias=champion")
    assert alias["model_version"]["tags"][0]["key"] == "val_miou"
    stored = s3_keys(s3_endpoint, "mlflow/")  # the model, figures and curves went through the server to S3
    assert any(k.endswith("/MLmodel") for k in stored) and any(k.endswith("predictions.png") for k in stored)
    out = run([sys.executable, "-m", "pipeline.predict", "reports/figures/predictions.png",
               "--model", "models:/segmentation-student@champion", "--out", "predicted"], repo).stdout
    assert out.strip().endswith("predicted/predictions.png") and (repo / "predicted/predictions_overlay.jpg").is_file()


def test_repeat_repro_runs_nothing(repo):
    out = run(["dvc", "repro"], repo).stdout
    assert "Running stage" not in out
    assert stale_stages(repo) == set()


def start(cmd: list[str], repo: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=repo, env=repo_env(repo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_a_second_repro_is_refused_while_one_runs(repo):
    first = start(["dvc", "repro", "--force", "--single-item", "evaluate"], repo)
    time.sleep(8)
    second = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True, env=repo_env(repo))
    assert second.returncode != 0 and "lock" in (second.stdout + second.stderr).lower()
    assert first.wait(600) == 0, first.stdout.read()[-3000:]
    assert stale_stages(repo) == set()


@pytest.mark.parametrize("seconds", [4, 15, 30])
def test_a_repro_killed_at_any_moment_reruns_to_a_correct_result(repo, seconds):
    """SIGKILL to DVC's process group (dvc, the stage) part-way through the last three stages
    (the execution's Ray then stops by itself); the next `dvc repro` reruns what did not finish
    and nothing else."""
    student = torch.load(repo / "models/student.pt", weights_only=True)["state_dict"]
    metrics = (repo / "reports/metrics.json").read_text()
    killed = start(["dvc", "repro", "--force", "--downstream", "pseudo_label@round1"], repo)
    time.sleep(seconds)
    os.killpg(killed.pid, 9)
    killed.wait()
    out = run(["dvc", "repro"], repo, timeout=900).stdout
    assert ran_stages(out) <= {"pseudo_label@round1", "student_train@round1", "evaluate"}
    assert stale_stages(repo) == set()
    assert run(["dvc", "status", "dvc.yaml"], repo).stdout.strip().endswith("Data and pipelines are up to date.")
    # Same params and seeds on CPU: the same bits, whatever ran again (the teacher's are checked
    # by the plain-baseline test, the pretrained decoder's by the one-seed study's DDeP pretraining).
    assert same_weights(torch.load(repo / "models/student.pt", weights_only=True)["state_dict"], student)
    assert (repo / "reports/metrics.json").read_text() == metrics
    assert not list(repo.rglob(".*.tmp"))


def test_a_student_change_reruns_two_stages_and_mlflow_compares_the_runs(repo, params_file, mlflow_server):
    run(["git", "add", "-A"], repo)  # the first run's metrics and plot tables, committed as DVC intends
    run(["git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "first run"], repo)
    # The default recipe's dense contrast, off in the smoke preset: a real stage trains and exports it.
    assert yaml.safe_load(params_file.read_text())["student"]["dense_contrast_weight"] == 0.0
    edit_params(params_file, "student", "dense_contrast_weight", 0.1)
    assert stale_stages(repo) == {"student_train@round1"}
    result = run([sys.executable, "-m", "pipeline.run"], repo, timeout=900)
    assert ran_stages(result.stdout) == {"student_train@round1", "evaluate"}
    first, second = [r for r in search_runs(mlflow_server, "tags.`pipeline.parent` = 'true'")
                     if r["info"]["status"] == "FINISHED"][-2:]
    assert (float(params_of(first)["student.dense_contrast_weight"]), float(params_of(second)["student.dense_contrast_weight"])) == (
        0.0, 0.1)
    assert {k for k in params_of(first) if params_of(first)[k] != params_of(second).get(k)} == {"student.dense_contrast_weight"}
    assert "student_miou" in metrics_of(second)
    assert sorted(children_of(mlflow_server, second)) == ["evaluate", "student_train@round1"]
    tags = tags_of(second)
    assert [s for s in STAGES if tags[stage_tag(s)] == "cached"] == STAGES[:5]
    assert f"MLflow run {second['info']['run_id']}: ran student_train@round1, evaluate" in result.stderr
    assert "viewStateShareKey=pipeline&workflowType=machine_learning" in result.stderr  # the runs page
    assert re.search(r"val mIoU: teacher \d\.\d{3}, student \d\.\d{3} \([+-]\d\.\d{3}\)", result.stderr)
    inputs = second["inputs"]["dataset_inputs"]  # the runs table's Dataset column
    assert [d["dataset"]["digest"] for d in inputs] == [tags["data.manifest_hash"]]
    for ray_line in ("Checkpoint successfully created", "Reporting training result"):  # PIPELINE_VERBOSE=1 only
        assert ray_line not in result.stdout + result.stderr
    plots = json.loads(run(["dvc", "plots", "diff", "HEAD", "--json"], repo).stdout)["data"]
    for plot in ("training_loss", "student_iou_per_class"):
        assert {rev for entry in plots[plot] for rev in entry["revisions"]} == {"HEAD", "workspace"}, plot
    assert plots["reports/pseudo_label/round1/pseudo_labels.png"] and plots["reports/figures/per_class_iou.png"]


def test_rounds_that_do_not_chain_are_refused_with_the_key_named(repo, params_file):
    edit_params(params_file, "self_training", "rounds", {"round1": "teacher", "round2": "teacher"})
    result = subprocess.run(["dvc", "repro"], cwd=repo, env=repo_env(repo), capture_output=True, text=True)
    assert result.returncode != 0
    assert "self_training.rounds: expected round1: teacher, then round2: round1" in result.stdout + result.stderr
    assert not (repo / "data/pseudo/round2").exists() and not (repo / "models/rounds/round2.pt").exists()


def test_a_second_round_learns_from_the_first_and_reruns_nothing_before_it(repo, params_file, mlflow_server):
    """`round2: round1` in params.yaml: two new stages, the round-1 student as their teacher,
    each its own MLflow run; round 1 and everything before it stay cached."""
    rounds = {"round1": "teacher", "round2": "round1"}
    edit_params(params_file, "self_training", "rounds", rounds)
    edges = set(re.findall(r'"([^"]+)" -> "([^"]+)"', run(["dvc", "dag", "--dot", "evaluate"], repo).stdout))
    assert {("student_train@round1", "pseudo_label@round2"), ("pseudo_label@round2", "student_train@round2"),
            ("student_train@round2", "evaluate"), ("student_train@round1", "student_train@round2")} <= edges
    result = run([sys.executable, "-m", "pipeline.run"], repo, timeout=900)
    assert ran_stages(result.stdout) == {"pseudo_label@round2", "student_train@round2", "evaluate"}
    parent = search_runs(mlflow_server, "tags.`pipeline.parent` = 'true'")[-1]
    children = children_of(mlflow_server, parent)
    assert sorted(children) == ["evaluate", "pseudo_label@round2", "student_train@round2"]
    assert "pseudo_miou" in metrics_of(children["pseudo_label@round2"])
    assert tags_of(parent)[stage_tag("student_train@round1")] == "cached"
    assert {"round1_miou", "student_miou", "teacher_miou"} <= set(metrics_of(parent))
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert list(metrics) == ["teacher", "round1", "student"]
    assert (repo / "models/student.pt").read_bytes() == (repo / "models/rounds/round2.pt").read_bytes()
    assert "round1" in (repo / "reports/per_class_iou.csv").read_text().splitlines()[0]


def test_sigma_change_starts_at_decoder_pretrain(repo, params_file):
    edit_params(params_file, "decoder_pretrain", "sigma", 0.4)
    assert stale_stages(repo) == {"decoder_pretrain"}


def test_ddep_leaves_the_encoder_bit_identical(repo):
    assert same_weights(encoder_of(repo / "models/pretrained.pt"), encoder_of(repo / "models/encoder.pt"))


def test_the_supervised_encoder_is_the_shipped_stand_in(repo):
    """`encoder.init: supervised` starts every dataset from the letters classifier in
    encoders/weights/ (as the paper's from ImageNet), never from the task's own labels."""
    assert same_weights(encoder_of(repo / "models/encoder.pt"), encoder_of(repo / "encoders/weights/tiny.pt"))
    assert not (repo / "data/prepared/classify").exists()


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


def worker_lines(output: str) -> dict[int, tuple[int, str]]:
    """rank -> (pid, node id) from the lines each training worker prints when it starts."""
    found = {}
    for line in output.splitlines():
        if (at := line.find("worker ")) >= 0 and " pid " in line and " on node " in line:
            words = line[at:].split()
            found[int(words[1].split("/")[0])] = (int(words[3]), words[6])
    return found


def watch(cmd: list[str], repo: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `cmd` in its own process group, its output going to `log` as soon as it is printed
    (unbuffered: a test acts on lines as they appear; verbose: they act on Ray Train's report
    line, CHECKPOINTED)."""
    return subprocess.Popen(cmd, cwd=repo, env={**repo_env(repo), "PYTHONUNBUFFERED": "1", "PIPELINE_VERBOSE": "1",
                                                **(env or {})},
                            stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(log: Path, text: str, count: int, process: subprocess.Popen, timeout: float = 600, after: str = "") -> None:
    """Until `log` holds `count` × `text` (counted after the first `after`, when given)."""
    deadline = time.time() + timeout
    while (log.read_text().partition(after)[2] if after else log.read_text()).count(text) < count:
        assert process.poll() is None, f"ended before {count}x {text!r}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {count}x {text!r} in {timeout}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


CHECKPOINTED = "Reporting training result"  # Ray Train's line once an epoch's checkpoint is persisted


def longer_teacher(params_file: Path, **extra) -> None:
    """A teacher long enough to be interrupted between checkpoints (six epochs of ~1 s here, or
    `epochs`): after the second, four or more are left for the test to see it and act, even
    when Ray forwards the worker's lines late."""
    params = yaml.safe_load(params_file.read_text())
    params["teacher"] |= {"epochs": 6, "steps_per_epoch": 30, **extra}
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def interrupt(repo: Path, log: Path, signal_number: int, env: dict | None = None) -> None:
    """`dvc repro` of the teacher, interrupted once two epochs are checkpointed."""
    stage = watch(["dvc", "repro", "--force", "--single-item", "teacher_finetune"], repo, log, env)
    wait_for(log, CHECKPOINTED, 2, stage)
    os.killpg(stage.pid, signal_number)  # Ctrl-C (or a scheduler's SIGTERM) to the whole foreground group
    assert stage.wait(120) != 0


def test_an_interrupted_stage_resumes_and_a_killed_worker_is_replaced_each_from_its_checkpoint(
        repo, params_file, mlflow_server, tmp_path):
    """Ctrl-C (SIGINT) to the whole `dvc repro` part-way, and the same `dvc repro` resumes the
    stage from its checkpoint; then one of its training workers is killed from outside, and Ray
    Train replaces it and goes on from its latest checkpoint, inside the relaunch's one MLflow
    run, to the exported model. (A scheduler's SIGTERM is interrupted and resumed the same way in
    the S3 test below; that a run under other params or inputs never resumes this one is
    test_launch's: the run's name.)"""
    longer_teacher(params_file, epochs=9)
    edit_params(params_file, "ray", "max_failures", 1)
    runs_before = len(search_runs(mlflow_server, "tags.`dvc.stage` = 'teacher_finetune'"))
    resumed = "resumed from the checkpoint of epoch "
    interrupt(repo, tmp_path / "interrupted.log", signal.SIGINT)
    log = tmp_path / "relaunch.log"
    stage = watch(["dvc", "repro", "--single-item", "teacher_finetune"], repo, log)
    wait_for(log, resumed, 1, stage)
    # Not from scratch. The second epoch's report may still be on its way to the controller when
    # the interrupt lands, so only the first checkpoint is sure to be registered.
    relaunched = int(log.read_text().split(resumed)[1].split("/")[0])
    assert relaunched >= 1
    wait_for(log, CHECKPOINTED, 2, stage, after=resumed)  # two more, the first surely registered
    pid = worker_lines(log.read_text())[0][0]
    os.kill(pid, 9)  # the training worker process, from outside
    killed_at = time.time()
    wait_for(log, resumed, 2, stage)
    print(f"recovery after a killed worker: {time.time() - killed_at:.1f} s")
    assert stage.wait(600) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert worker_lines(out)[0][0] != pid  # a replacement worker
    replaced = int(out.split(resumed)[2].split("/")[0])
    # A trained epoch prints "epoch N/9 loss=…"; a resume line may name an epoch itself.
    assert replaced > relaunched and "epoch 1/9 loss=" not in out
    assert "[teacher_finetune] done" in out and "epoch 9/9" in out
    runs = search_runs(mlflow_server, "tags.`dvc.stage` = 'teacher_finetune'")
    assert len(runs) == runs_before + 2  # the interrupted launch's, then the relaunch's, replacement and all
    assert metrics_of(runs[-1])["resumed_at_epoch"] == replaced and metrics_of(runs[-1])["epoch"] == 9


def test_workers_read_shards_and_keep_checkpoints_in_s3_and_an_interrupted_stage_resumes_from_there(
        repo, params_file, tmp_path, s3_endpoint):
    """`ray.data_uri` and `ray.storage_path` in the bucket: `prepare` uploads the shards,
    training and batch inference read them from there, Ray Train writes the checkpoints
    there, a rerun restores from them, and the stage removes them once it has exported."""
    edit_params(params_file, "ray", "storage_path", f"s3://{BUCKET}/ray")
    edit_params(params_file, "ray", "data_uri", f"s3://{BUCKET}/shards")
    env = s3_endpoint.env
    run(["dvc", "repro", "--force", "--single-item", "prepare"], repo, env=env, timeout=600)
    shards = list((repo / "data/prepared").glob("*/*.parquet"))
    assert len(s3_keys(s3_endpoint, "shards/")) == len(shards)
    longer_teacher(params_file)
    interrupt(repo, tmp_path / "first.log", 15, env)
    assert f"read from s3://{BUCKET}/shards (0 uploaded now)" in (tmp_path / "first.log").read_text()
    assert any("/checkpoint_" in key for key in s3_keys(s3_endpoint, "ray/teacher_finetune"))
    out = run(["dvc", "repro", "--no-run-cache", "--single-item", "teacher_finetune"], repo, env=env,
              timeout=600).stdout
    assert "resumed from the checkpoint of epoch" in out and "epoch 6/6" in out
    assert not [key for key in s3_keys(s3_endpoint, "ray/") if "/checkpoint_" in key]
    inference = run(["dvc", "repro", "--force", "--single-item", "pseudo_label@round1"], repo, env=env, timeout=600)
    assert f"read from s3://{BUCKET}/shards" in inference.stdout + inference.stderr


def test_outputs_push_to_and_pull_from_a_dvc_remote_on_s3(repo, s3_endpoint):
    run(["dvc", "remote", "add", "--local", "-f", "objects", f"s3://{BUCKET}/dvc"], repo)
    run(["dvc", "remote", "modify", "--local", "objects", "endpointurl", s3_endpoint.url], repo)
    env = s3_endpoint.env
    run(["dvc", "push", "-r", "objects", TEACHER], repo, env=env)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    md5 = next(o["md5"] for o in lock["stages"]["teacher_finetune"]["outs"] if o["path"] == TEACHER)
    assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in s3_keys(s3_endpoint, "dvc/")
    teacher = repo / TEACHER
    weights = teacher.read_bytes()
    teacher.unlink()
    (repo / f".dvc/cache/files/md5/{md5[:2]}/{md5[2:]}").unlink()  # only the remote has it now
    run(["dvc", "pull", "-r", "objects", TEACHER], repo, env=env)
    assert teacher.read_bytes() == weights
