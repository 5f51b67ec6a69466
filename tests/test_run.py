import os
import subprocess
import sys
from pathlib import Path

from pipeline.run import frozen_locks_kept

DVC = str(Path(sys.executable).parent / "dvc")
ROOT = Path(__file__).resolve().parent.parent


def _sh(args: list[str], cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True)


def test_a_forced_repro_leaves_a_frozen_stages_lock_as_it_was_built(tmp_path):
    """DVC's `repro --force` rewrites a frozen stage's dependency hashes without running it
    (DVC issue #11004); around `pipeline.run`'s `dvc repro` the lock is put back."""
    _sh(["git", "init", "-q"], tmp_path)
    _sh([DVC, "init", "-q"], tmp_path)
    (tmp_path / "made").mkdir()
    (tmp_path / "code.txt").write_text("v1\n")
    (tmp_path / "made" / "dvc.yaml").write_text(
        "stages:\n  shipped:\n    wdir: ..\n    cmd: cp code.txt weights.txt\n    deps: [code.txt]\n"
        "    outs:\n      - weights.txt:\n          cache: false\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  use:\n    cmd: cp weights.txt used.txt\n    deps: [weights.txt]\n"
                                       "    outs: [used.txt]\n")
    _sh([DVC, "repro"], tmp_path)
    _sh([DVC, "freeze", "made/dvc.yaml:shipped"], tmp_path)
    built = (tmp_path / "made" / "dvc.lock").read_text()
    (tmp_path / "code.txt").write_text("v2\n")  # the code changed after the weights were made
    _sh([DVC, "repro", "--force"], tmp_path)
    assert (tmp_path / "made" / "dvc.lock").read_text() != built  # what the guard is for
    (tmp_path / "made" / "dvc.lock").write_text(built)
    (tmp_path / "used.txt").unlink()
    with frozen_locks_kept(tmp_path):
        _sh([DVC, "repro", "--force"], tmp_path)
    assert (tmp_path / "made" / "dvc.lock").read_text() == built
    assert (tmp_path / "weights.txt").read_text() == (tmp_path / "used.txt").read_text() == "v1\n"  # the rest ran


def test_the_run_ends_with_the_scores_the_gain_the_time_and_where_the_figures_are(tmp_path):
    import json

    from pipeline.run import outcome

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"teacher": {"miou": 0.4341, "boundary_f1": 0.618},
                                   "round1": {"miou": 0.47}, "student": {"miou": 0.5112, "boundary_f1": 0.679}}))
    assert outcome(metrics, 357.4, "reports/figures") == [
        "val mIoU: teacher 0.434, student 0.511 (+0.077); boundary F1: 0.618 -> 0.679",
        "took 5 min 57 s; figures in reports/figures/ (every plot in one page: make report; every score: dvc metrics show)"]
    metrics.write_text(json.dumps({"teacher": {"miou": 0.3}}))  # a DAG without a student: no gain to show
    assert outcome(metrics, 59.6, "f")[0].startswith("took 1 min 0 s")


def test_a_failed_stage_is_named_last_with_where_the_runs_whole_output_is(tmp_path):
    """`python -m pipeline.run` in a project whose second stage fails: its own error stays where
    it was printed, and the run's last line names the stage and the log that holds all of it."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["encoder"]["init"] = "random"
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({
        "vars": [{"paths": {"metrics": "metrics.json", "figures": "figures"}}],
        "stages": {"first": {"cmd": "echo made > made.txt", "outs": ["made.txt"]},
                   "second": {"cmd": "python -c \"import sys; sys.exit('error: made.txt: expected more')\"",
                              "deps": ["made.txt"]}}}))
    _sh(["git", "init", "-q"], tmp_path)
    _sh([DVC, "init", "-q"], tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "RAY_ADDRESS": "127.0.0.1:1"}  # a cluster named: no local Ray is started for stages that need none
    result = subprocess.run([sys.executable, "-m", "pipeline.run"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage 'second' failed; the run's whole output is in logs/run-"), result.stderr
    log = tmp_path / last.split("output is in ")[1]
    text = log.read_text()
    for line in ("Running stage 'first'", "error: made.txt: expected more", "failed to reproduce 'second'", last):
        assert line in text


def test_a_timm_encoder_offline_and_not_cached_is_refused_before_any_stage(tmp_path):
    (tmp_path / "params.yaml").write_text("model:\n  preset: r50_vit_b16\n  decoder_in_channels: 512\n"
                                          "  decoder_channels: [256, 128, 64, 16]\nencoder:\n  init: timm\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipeline.run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 1 and not (tmp_path / "logs").exists()  # no DVC, no log: nothing ran
    assert done.stderr.strip() == (
        f"error: encoder.init: 'timm': HF_HUB_OFFLINE is set and vit_base_r50_s16_224.orig_in21k is not in the Hugging "
        f"Face cache {tmp_path / 'hub'}; fetch it where there is internet (`python -c \"import timm; "
        "timm.create_model('vit_base_r50_s16_224.orig_in21k', pretrained=True)\"`) and copy that cache here, or "
        "set encoder.weights_path to a downloaded copy of the weights file")
    snapshot = tmp_path / "hub" / "models--timm--vit_base_r50_s16_224.orig_in21k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    check = "from pipeline.config.params import hub_release_at_hand; hub_release_at_hand('vit_base_r50_s16_224.orig_in21k')"
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr  # in the cache: the run goes on
