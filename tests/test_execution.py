"""Telling the `dvc repro` a stage runs under, and whether a process still runs (the stand-in
DVC of tests/test_local_ray.py checks a stage finds its DVC process)."""

import os
import subprocess
import time

from conftest import wait_until

from pipeline.runtime.execution import ProcessRef, dvc_process, is_dvc_command, seconds_since_start


def test_a_stage_run_by_hand_has_no_dvc_process():
    assert dvc_process() is None


def test_a_process_ref_tells_a_running_process_from_an_exited_one():
    child = subprocess.Popen(["sleep", "30"])
    ref = ProcessRef.of(child.pid)
    assert ProcessRef.parse(str(ref)) == ref and ref.running()
    child.kill()
    assert wait_until(lambda: not ref.running(), 10)  # a zombie until waited for: already not running
    child.wait()
    assert not ref.running() and not ProcessRef(os.getpid(), "0").running()


def test_only_dvc_repro_and_dvc_exp_count_as_dvc():
    assert is_dvc_command(["/venv/bin/python", "/venv/bin/dvc", "repro", "--force"])
    assert is_dvc_command(["dvc", "exp", "run", "-S", "student.lr=0.01"])
    assert is_dvc_command(["python3", "-m", "dvc", "repro"])
    assert not is_dvc_command(["dvc", "status"])
    assert not is_dvc_command(["tmux", "new", "-s", "dvc-repro"])
    assert not is_dvc_command(["bash", "/home/me/dvc-repro/run.sh", "dvc", "repro"])
    assert not is_dvc_command([""])


def test_a_process_age_is_exact_to_a_clock_tick():
    """A stage's wall time counts from its process's start, so its age must not be rounded to
    the second, nor come out longer than the time since the process was launched."""
    launched = time.time()
    proc = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.3)
        age = seconds_since_start(proc.pid)
        since_launch = time.time() - launched
        assert -0.02 <= since_launch - age < 0.25
    finally:
        proc.kill()
        proc.wait()
