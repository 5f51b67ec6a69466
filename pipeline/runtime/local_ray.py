"""One local Ray for many stages, so that each stage saves the seconds of starting and
stopping its own.

Under `dvc repro` (or `dvc exp run`) this happens by itself: the first stage that needs Ray
starts a local instance for the whole execution in a process of its own (`--serve`), the
later stages connect to it, and it stops once that DVC process has exited, however it exits.
A stage run by hand starts and stops its own.

For a command that runs several `dvc repro`s, or stages itself, wrap it:

    python -m pipeline.runtime.local_ray -- python -m pipeline.tools.study

The instance then lives exactly as long as the command: it stops when the command ends, fails
or is interrupted. When `RAY_ADDRESS` (or `ray.address`) names a cluster, stages and commands
simply run against that. `python -m pipeline.run` (what `make run` does) starts its `dvc repro`'s
Ray as soon as it has launched DVC (`prestart_execution_ray`), so that Ray starts while DVC does.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config.params import PARAMS_FILE, RayConfig, load_params
from pipeline.runtime.execution import ProcessRef, dvc_process

# On a Ray this pipeline starts itself, on one machine, no node can be preempted: Ray Train's
# preemption watcher would only be one more actor process per stage (~1.2 s of CPU to start,
# while the worker imports torch) and a poller beside the training loop. A cluster keeps it.
# A stage's driver passes them on to Ray Train's controller and workers.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Read by the raylet of a Ray this pipeline starts. Ray starts one idle Python worker per CPU
# when its first driver connects, for that driver's tasks; a stage's job asks for workers with
# its own runtime env, which those do not have, so they only took the cores while the job of a
# stage (or test) with a Ray of its own started: an empty Ray Train job on a new Ray 17.2 ->
# 14.7 s here, medians of 4. (A repro's shared Ray is its own first driver, long before a stage.)
LOCAL_RAY_ENV = {"RAY_prestart_worker_first_driver": "0"}
# A Ray this pipeline starts serves this machine's stages alone, so every server of it (GCS, the
# raylet's node and object managers, each driver's and worker's gRPC server, the runtime-env agent)
# listens on loopback only. Ray binds them there only when its node IP is loopback, and on Linux it
# keeps a loopback node IP only with this setting, which Ray reads on import (its default on macOS
# and Windows, where it makes single-node Rays: `ray start --address` is refused). Without it, Ray
# turns 127.0.0.1, whether given as `_node_ip_address`, `ray start --node-ip-address` or in an
# address to connect to, into the machine's routable IP and binds all interfaces. A driver that
# connects to such a Ray at 127.0.0.1 needs it too. A cluster named by `RAY_ADDRESS` never gets it.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# What a stage takes from the environment of the Ray it connects to: Ray reads it on import.
SHARED_ENV = ("RAY_AUTH_MODE",)

SERVER_START_TIMEOUT_S = 120
SERVER_POLL_S = 0.5  # how soon after `dvc repro` ends its Ray starts stopping


def local_cpus(ray_cfg: RayConfig | None) -> int:
    """Logical CPUs for a local Ray: the machine's, or what the training workers or the
    inference actors ask for, plus one. Both hold their CPUs for the whole job and Ray Data's
    read tasks need one more, or they wait forever."""
    held = max(ray_cfg.num_workers, ray_cfg.inference_actors) * ray_cfg.cpus_per_worker if ray_cfg else 1
    return max(os.cpu_count() or 1, held) + 1


def start_local_ray(num_cpus: int, **init_options):
    """Start a new local Ray (never attach to one already running on the machine, whose
    resources we do not know) whose servers all listen on loopback only (`LOOPBACK_ENV`), with
    this process's environment (and so its stages' and Ray's workers') given that setting and
    the Ray Train and raylet settings for one machine, values already set winning for the latter; returns
    `ray.init`'s context. Best called before Ray is imported."""
    for key, value in {**LOCAL_TRAIN_ENV, **LOCAL_RAY_ENV}.items():
        os.environ.setdefault(key, value)
    _use_loopback()
    import ray

    context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **init_options)
    node_ip = context.address_info["node_ip_address"]
    if not _is_loopback(node_ip):
        ray.shutdown()
        raise RuntimeError(f"the local Ray took {node_ip} for its node IP, not loopback, and so listened "
                           f"on every interface; it was stopped")
    return context


def _use_loopback() -> None:
    """`LOOPBACK_ENV` for this process and its children. Ray reads it on import: where Ray was
    imported before, its reading is set to what it would have read (the first `ray.init` reads it,
    when it resolves the node IP)."""
    os.environ.update(LOOPBACK_ENV)
    if "ray" in sys.modules:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def _is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, IPv4-mapped (::ffff:127.0.0.1, how Ray's gRPC servers bind 127.0.0.1) included."""
    import ipaddress

    address = ipaddress.ip_address(ip.strip("[]").split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def execution_ray_address(ray_cfg: RayConfig) -> str | None:
    """Under `dvc repro` (or `dvc exp run`), the address of that execution's one local Ray,
    started by its first Ray stage (`execution_ray`) and connected to by the rest, each saving
    the seconds of starting and stopping its own; this process's environment gets what Ray
    must know to connect. None (the stage starts its own) when run by hand, when asking for
    more CPUs than that Ray has, when it cannot be started, or once Ray is imported: Ray
    reads its token-authentication mode from the environment on import, so call this before."""
    dvc = dvc_process()
    if dvc is None or "ray" in sys.modules:
        return None
    try:
        shared = execution_ray(dvc, local_cpus(ray_cfg))
    except (OSError, RuntimeError) as err:
        print(f"warning: {err}; this stage starts a Ray of its own", file=sys.stderr, flush=True)
        return None
    if shared is None:
        return None
    for key, value in {**LOCAL_TRAIN_ENV, **shared["env"]}.items():
        os.environ.setdefault(key, value)
    os.environ.update(LOOPBACK_ENV)  # or Ray would not look for it at 127.0.0.1, where it listens
    return shared["address"]


def prestart_execution_ray(dvc_pid: int, ray_cfg: RayConfig | None) -> str | None:
    """Start the local Ray of the `dvc repro` just launched as `dvc_pid` now, while DVC starts
    and runs the stages before the first that needs Ray, instead of when that stage asks for it;
    return its session folder (its logs are there). Nothing when a cluster is named; on a
    failure the stages start it, as under a bare `dvc repro`."""
    if _cluster_named(ray_cfg):
        return None
    try:
        dvc = ProcessRef.of(dvc_pid)
    except OSError:  # DVC has already exited: nothing to serve
        return None
    try:
        info = execution_ray(dvc, local_cpus(ray_cfg))
    except (OSError, RuntimeError) as err:
        print(f"warning: {err}; its first Ray stage starts it", file=sys.stderr, flush=True)
        return None
    return info["session_dir"] if info else None


def _cluster_named(ray_cfg: RayConfig | None) -> bool:
    return bool(ray_cfg.resolved_address() if ray_cfg is not None else os.environ.get("RAY_ADDRESS"))


def shared_dir() -> Path:
    """This user's folder of announcements, one file per execution: private (0700, owned by
    this user), since a stage connects to the Ray a file names and takes settings from it."""
    path = Path(tempfile.gettempdir()) / f"pipeline-ray-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    found = os.lstat(path)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise RuntimeError(f"{path} is not a folder of this user's alone (owner uid {found.st_uid}, "
                           f"mode {stat.S_IMODE(found.st_mode):o}); expected one made with mode 700")
    return path


def _live_state(state: Path) -> dict | None:
    """What a running server wrote about its Ray, or None (no server, one that died, or a file
    that is not a server's)."""
    try:
        info = json.loads(state.read_text())
        server = ProcessRef.parse(info["server"])
        info = {"address": str(info["address"]), "num_cpus": int(info["num_cpus"]),
                "session_dir": str(info["session_dir"]),
                "env": {key: str(value) for key, value in info["env"].items() if key in SHARED_ENV}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return info if server.running() else None


def execution_ray(dvc: ProcessRef, cpus: int) -> dict | None:
    """The local Ray serving `dvc`'s execution ({address, num_cpus, session_dir, env}), started
    now by a server process of its own (`serve`) when there is none; None when it has fewer
    than `cpus` CPUs, or when `dvc` ended before it was up. The server outlives the stage that
    started it and stops Ray once `dvc` exits, however it exits."""
    state = shared_dir() / f"{dvc}.json"
    with open(state.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one server, should two stages ever look at once
        info = _live_state(state)
        if info is None:
            info = _start_server(dvc, cpus, state)
    return info if info is not None and info["num_cpus"] >= cpus else None


def _start_server(dvc: ProcessRef, cpus: int, state: Path) -> dict | None:
    log = state.with_suffix(".log")
    print(f"starting a local Ray for this execution (pid {dvc.pid}); it stops when the execution ends",
          file=sys.stderr, flush=True)
    with open(log, "w") as out:
        # A session of its own: Ctrl-C or a kill of DVC's process group must not reach it
        # before it has stopped Ray; and none of DVC's pipes, which would keep their readers waiting.
        server = subprocess.Popen([sys.executable, "-m", "pipeline.runtime.local_ray", "--serve", str(dvc), str(cpus)],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while (info := _live_state(state)) is None:
        if server.poll() == 0 and not dvc.running():  # DVC ended first; its Ray is already gone
            return None
        if server.poll() is not None:
            why = f"exited with {server.returncode}"
        elif time.monotonic() > deadline:
            os.killpg(server.pid, signal.SIGTERM)
            why = f"did not start within {SERVER_START_TIMEOUT_S} s"
        else:
            time.sleep(0.05)
            continue
        raise RuntimeError(f"the local Ray for this execution {why}; its log ({log}):\n{_tail(log)}")
    return info


def _tail(path: Path) -> str:
    try:
        return path.read_text()[-3000:]
    except OSError as err:
        return f"(unreadable: {err})"


def serve(dvc: ProcessRef, num_cpus: int) -> int:
    """Start a local Ray, publish its address for `dvc`'s stages, and stop it once `dvc` has
    exited, or once one of Ray's own processes has died (the next stage then starts another)."""
    import psutil

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    state = shared_dir() / f"{dvc}.json"
    published = False
    try:
        context = start_local_ray(num_cpus, log_to_driver=False)
        ray_processes = psutil.Process().children()
        info = {"address": context.address_info["gcs_address"], "num_cpus": num_cpus,
                "session_dir": context.address_info["session_dir"], "server": str(ProcessRef.of(os.getpid())),
                # Ray's token authentication mode, as it chose for this instance.
                "env": {key: os.environ[key] for key in SHARED_ENV if key in os.environ}}
        written = state.with_suffix(".tmp")
        written.write_text(json.dumps(info))
        written.replace(state)
        published = True
        while dvc.running() and all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ray_processes):
            time.sleep(SERVER_POLL_S)
    finally:
        # Before it is published, a stage waits on this server and shows its log.
        for suffix in (".json", ".tmp", ".lock") + ((".log",) if published else ()):
            state.with_suffix(suffix).unlink(missing_ok=True)
        import ray  # here, after `start_local_ray` has set what Ray reads on import

        ray.shutdown()
    return 0


@contextmanager
def shared_ray(ray_cfg: RayConfig | None) -> Iterator[dict]:
    """The environment for child processes that should all use one Ray: the running cluster's
    when one is named, else a local instance started here and stopped on exit."""
    if _cluster_named(ray_cfg):
        yield dict(os.environ)
        return
    context = start_local_ray(local_cpus(ray_cfg), log_to_driver=False)
    import ray

    try:
        yield {**os.environ, "RAY_ADDRESS": context.address_info["gcs_address"]}
    finally:
        ray.shutdown()


def params_ray_config() -> RayConfig | None:
    """`params.yaml`'s ray section when the file exists (raises ConfigError when invalid)."""
    return load_params(PARAMS_FILE).ray if os.path.exists(PARAMS_FILE) else None


def main(argv: list[str] | None = None) -> int:
    from pipeline.config.params import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:  # started by `execution_ray`: --serve DVC_PROCESS NUM_CPUS
        return serve(ProcessRef.parse(argv[1]), int(argv[2]))
    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    if not command or command[0] in ("-h", "--help"):
        print(f"usage: python -m pipeline.runtime.local_ray -- COMMAND [ARGS...]\n{__doc__}")
        return 0 if command else 2
    try:
        ray_cfg = params_ray_config()
    except ConfigError as err:
        sys.exit(f"error: {err}")
    with shared_ray(ray_cfg) as env:
        return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
