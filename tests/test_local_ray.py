"""The local Ray one `dvc repro` shares among its stages: started by the first, reused by the
next, stopped once DVC has exited, however it exits. A stand-in for DVC (a script named `dvc`
run as `dvc repro`) runs stand-in stages that connect and run a task."""

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import psutil
import pytest
from conftest import wait_until

from pipeline.runtime.local_ray import local_cpus, prestart_execution_ray, shared_dir
from pipeline.config.params import RayConfig
from pipeline.runtime.execution import ProcessRef

ROOT = Path(__file__).resolve().parent.parent

# A stage: `python stage.py NUM_WORKERS`, its Ray config asking for that many 1-CPU workers.
STAGE = textwrap.dedent("""
    import json, sys
    from pipeline.config.params import RayConfig
    from pipeline.runtime.execution import dvc_process
    from pipeline.runtime.ray_session import init_ray

    init_ray(RayConfig(num_workers=int(sys.argv[1]), cpus_per_worker=1))
    import ray

    @ray.remote
    def found():  # the Ray that Ray's own lookups in a worker (the State API's among them) find
        from ray._private.services import canonicalize_bootstrap_address_or_die
        return canonicalize_bootstrap_address_or_die(None)

    print(json.dumps({"address": ray.get_runtime_context().gcs_address, "dvc": str(dvc_process()),
                      "answer": ray.get(ray.remote(lambda: 42).remote()), "found": ray.get(found.remote())}),
          flush=True)
""")
BIG = os.cpu_count() + 4  # more workers than the shared Ray, sized by the first stage, has CPUs for

# A stage's driver on a running Ray: connects by `init_ray` (to the `RAY_ADDRESS` it is given), runs a
# task and an actor, prints the answer and the address it connected to, then holds on until told.
DRIVER = textwrap.dedent("""
    import sys
    from pipeline.config.params import RayConfig
    from pipeline.runtime.ray_session import init_ray

    init_ray(RayConfig(cpus_per_worker=1))
    import ray

    @ray.remote
    class Echo:
        def echo(self, value):
            return value

    answer = ray.get(Echo.remote().echo.remote(ray.get(ray.remote(lambda: 42).remote())))
    print(answer, ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.readline()
""")
# `python -m pipeline.runtime.local_ray -- driver.py`, and then some: the local Ray `shared_ray` starts (by
# `start_local_ray`) with the driver connected to it, and, while they run, the listening TCP sockets
# of this process and of every process under it (Ray's and the driver's), as JSON.
SHARED = textwrap.dedent("""
    import json, subprocess, sys
    import psutil
    from pipeline.runtime.local_ray import shared_ray

    with shared_ray(None) as env:
        driver = subprocess.Popen([sys.executable, sys.argv[1]], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        answer, address = driver.stdout.readline().split()
        listening = []
        for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            try:
                listening += [[proc.name(), conn.laddr.ip, conn.laddr.port]
                              for conn in proc.net_connections("tcp") if conn.status == psutil.CONN_LISTEN]
            except psutil.Error:  # one that ended meanwhile
                pass
        driver.communicate("\\n")
    print(json.dumps({"answer": int(answer), "address": address, "published": env["RAY_ADDRESS"],
                      "listening": listening, "driver": driver.returncode}))
""")


def loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also as IPv4-mapped IPv6 (::ffff:127.0.0.1: a dual-stack socket that takes
    connections to 127.0.0.1 only)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def fake_dvc(tmp_path: Path, workers: list[int], hold_s: float, before_s: float = 0) -> Path:
    """A `dvc` that, after `before_s` seconds (stages without Ray), runs one stage per entry of
    `workers`, one after the other, through a shell as `dvc repro` does; then holds on for
    `hold_s` seconds."""
    (tmp_path / "stage.py").write_text(STAGE)
    dvc = tmp_path / "dvc"
    stages = "".join(f"sh -c '{sys.executable} {tmp_path / 'stage.py'} {n}'\n" for n in workers)
    dvc.write_text(f"#!/bin/bash\necho dvc $$\nsleep {before_s}\n{stages}sleep {hold_s}\n")
    dvc.chmod(0o755)
    return dvc


@pytest.fixture
def temp_dir():
    """A TMPDIR of the test's own, short: Ray keeps its sockets under it, and a socket's path
    may not be longer than 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(dvc: Path, temp_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(temp_dir)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([str(dvc), "repro"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)


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
def test_the_local_ray_and_its_drivers_listen_on_loopback_only(tmp_path, temp_dir):
    """A Ray this pipeline starts serves this machine alone: none of its servers (GCS, raylet,
    object manager, agents, workers, actors, the drivers' own) listens on another interface, and a
    stage's driver connects to it at the loopback address it is given."""
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "shared.py").write_text(SHARED)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(temp_dir)}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, str(tmp_path / "shared.py"), str(tmp_path / "driver.py")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.splitlines()[-1])
    assert found["answer"] == 42 and found["driver"] == 0
    names = {name for name, _, _ in found["listening"]}
    assert {"gcs_server", "raylet"} <= names and len(names) >= 4, found["listening"]  # drivers, workers, agents
    assert [socket for socket in found["listening"] if not loopback(socket[1])] == []
    assert found["address"] == found["published"] and loopback(found["published"].rsplit(":", 1)[0])


def test_the_announcements_folder_must_be_this_users_alone(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = shared_dir()
    assert folder.parent == tmp_path and folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o777)  # as if someone else had made it for everyone
    with pytest.raises(RuntimeError, match=f"{folder}.*mode 777"):
        shared_dir()


@pytest.mark.slow
def test_the_stages_of_one_repro_share_one_local_ray_that_stops_when_dvc_exits(tmp_path, temp_dir):
    """The third stage asks for more CPUs than the shared Ray has and starts its own."""
    dvc = start(fake_dvc(tmp_path, [1, 1, BIG], hold_s=0), temp_dir)
    out, _ = dvc.communicate(timeout=300)  # ends with DVC: the server holds none of its pipes
    assert dvc.returncode == 0, out
    dvc_pid, *stages = out.splitlines()
    first, second, big = map(json.loads, stages)
    assert first["answer"] == second["answer"] == big["answer"] == 42
    assert first["address"] == second["address"] != big["address"]
    # The big stage runs while the shared Ray does: its workers still find their own.
    assert [stage["found"] for stage in (first, second, big)] == [stage["address"] for stage in (first, second, big)]
    assert first["dvc"] == second["dvc"] and first["dvc"].startswith(f"{dvc_pid.split()[1]}-")
    folder = temp_dir / f"pipeline-ray-{os.getuid()}"
    assert wait_until(lambda: not list(folder.iterdir()), 60), list(folder.iterdir())


@pytest.mark.slow
def test_a_killed_repro_leaves_no_ray_behind(tmp_path, temp_dir):
    dvc = start(fake_dvc(tmp_path, [1], hold_s=120), temp_dir)
    dvc_pid = int(dvc.stdout.readline().split()[1])
    stage = json.loads(dvc.stdout.readline())
    state = temp_dir / f"pipeline-ray-{os.getuid()}" / f"{ProcessRef.of(dvc_pid)}.json"
    info = json.loads(state.read_text())
    assert info["address"] == stage["address"] and info["num_cpus"] == local_cpus(RayConfig(cpus_per_worker=1))
    assert loopback(info["address"].rsplit(":", 1)[0])  # where the execution's Ray listens, and alone
    server = ProcessRef.parse(info["server"])
    assert server.running() and session_processes(info["session_dir"])
    os.killpg(dvc.pid, signal.SIGKILL)  # what a closed terminal or a scheduler does to DVC and its stages
    assert dvc.wait(60) == -signal.SIGKILL
    assert wait_until(lambda: not server.running(), 60)
    assert wait_until(lambda: not session_processes(info["session_dir"]), 30)
    assert not list(state.parent.iterdir())


@pytest.mark.slow
def test_pipeline_run_starts_the_ray_of_its_repro_while_dvc_starts(tmp_path, temp_dir, monkeypatch):
    """What `python -m pipeline.run` does once it has launched DVC: the stage finds that Ray
    running and connects, without starting another."""
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    for key, value in {"TMPDIR": str(temp_dir), "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}.items():
        monkeypatch.setenv(key, value)  # the server's
    dvc = start(fake_dvc(tmp_path, [1], hold_s=0, before_s=5), temp_dir)
    prestart_execution_ray(dvc.pid, RayConfig(cpus_per_worker=1))
    info = json.loads((shared_dir() / f"{ProcessRef.of(dvc.pid)}.json").read_text())
    assert psutil.Process(ProcessRef.parse(info["server"]).pid).ppid() == os.getpid()
    out, _ = dvc.communicate(timeout=300)
    assert dvc.returncode == 0, out
    assert json.loads(out.splitlines()[1])["address"] == info["address"]
    assert wait_until(lambda: not session_processes(info["session_dir"]), 60)
    assert not list(shared_dir().iterdir())


def test_pipeline_run_starts_no_ray_for_a_dvc_already_gone_or_a_named_cluster(temp_dir, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    gone = subprocess.Popen(["true"])
    gone.wait()
    prestart_execution_ray(gone.pid, RayConfig())
    running = subprocess.Popen(["sleep", "30"])
    try:
        prestart_execution_ray(running.pid, RayConfig(address="127.0.0.1:1"))
    finally:
        running.kill()
        running.wait()
    assert not list(shared_dir().iterdir())


@pytest.mark.slow
def test_the_local_ray_starts_no_idle_workers_for_its_first_driver(temp_dir):
    """Ray starts an idle Python worker per CPU when its first driver connects; a stage's job
    asks for workers with its own runtime env, so those would only take the cores while the
    first stage's job starts."""
    script = textwrap.dedent("""
        import time, psutil
        from pipeline.runtime.local_ray import start_local_ray
        start_local_ray(2, runtime_env={"env_vars": {"STAGE": "1"}})  # as a stage's `init_ray` does
        time.sleep(6)  # they come within a few seconds of the driver's connection
        print(sorted(p.name() for p in psutil.Process().children(recursive=True)))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(temp_dir)}
    for key in ("RAY_ADDRESS", "RAY_prestart_worker_first_driver"):
        env.pop(key, None)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    names = run.stdout.splitlines()[-1]
    assert "raylet" in names and "ray::IDLE" not in names, names
