import subprocess
import sys
from pathlib import Path

from pipeline.run import frozen_locks_kept

DVC = str(Path(sys.executable).parent / "dvc")


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
