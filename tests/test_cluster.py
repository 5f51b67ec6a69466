"""The local Ray one `dvc repro` shares among its stages: started by the first, reused by the
next, stopped once DVC has exited, however it exits. A stand-in for DVC (a script named `dvc`
run as `dvc repro`) runs two stand-in stages that connect and run a task."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from conftest import wait_until

from pipeline.cluster import SHARED_DIR, local_cpus
from pipeline.config import RayConfig
from pipeline.execution import ProcessRef, dvc_process

ROOT = Path(__file__).resolve().parent.parent

STAGE = textwrap.dedent("""
    import json
    from pipeline.config import RayConfig
    from pipeline.execution import dvc_process
    from pipeline.raytrain import init_ray

    init_ray(RayConfig())
    import ray

    print(json.dumps({"address": ray.get_runtime_context().gcs_address, "dvc": str(dvc_process()),
                      "answer": ray.get(ray.remote(lambda: 42).remote())}), flush=True)
""")

def fake_dvc(tmp_path: Path, hold_s: float) -> Path:
    """A `dvc` that runs two stages one after the other, as `dvc repro` would, through a shell;
    then holds on for `hold_s` seconds."""
    (tmp_path / "stage.py").write_text(STAGE)
    dvc = tmp_path / "dvc"
    stage = f"{sys.executable} {tmp_path / 'stage.py'}"
    dvc.write_text(f"#!/bin/bash\necho dvc $$\nsh -c '{stage}'\nsh -c '{stage}'\nsleep {hold_s}\n")
    dvc.chmod(0o755)
    return dvc


def start(dvc: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([str(dvc), "repro"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def session_processes(session_dir: str) -> list[psutil.Process]:
    """Ray's processes of one instance: their command lines name its session folder."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(session_dir in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_the_local_ray_is_sized_for_the_workers_or_the_actors_plus_a_reader():
    assert local_cpus(RayConfig(num_workers=2, cpus_per_worker=2)) == max(os.cpu_count(), 4) + 1
    assert local_cpus(RayConfig(inference_actors=3, cpus_per_worker=1)) == max(os.cpu_count(), 3) + 1


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_the_stages_of_one_repro_share_one_local_ray_that_stops_when_dvc_ends(tmp_path, ending):
    dvc = start(fake_dvc(tmp_path, hold_s=0 if ending == "exit" else 60))
    dvc_pid = int(dvc.stdout.readline().split()[1])
    first, second = (json.loads(dvc.stdout.readline()) for _ in range(2))
    assert first["answer"] == second["answer"] == 42
    assert first["address"] == second["address"]
    assert first["dvc"] == str(ProcessRef.of(dvc_pid))
    state = SHARED_DIR / f"{first['dvc']}.json"
    info = json.loads(state.read_text())
    assert info["address"] == first["address"] and info["num_cpus"] == local_cpus(RayConfig())
    server = ProcessRef.parse(info["server"])
    assert server.running() and session_processes(info["session_dir"])
    if ending == "sigkill":  # what a killed terminal does to DVC and its stages
        os.killpg(dvc.pid, signal.SIGKILL)
    assert dvc.wait(60) == (0 if ending == "exit" else -signal.SIGKILL), dvc.stderr.read()[-2000:]
    assert wait_until(lambda: not server.running(), 60)
    assert wait_until(lambda: not session_processes(info["session_dir"]), 30)
    assert not state.exists() and not state.with_suffix(".lock").exists()
