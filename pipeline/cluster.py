"""One local Ray for many stages, so that each stage saves the seconds of starting and
stopping its own.

Under `dvc repro` (or `dvc exp run`) this happens by itself: the first stage that needs Ray
starts a local instance for the whole execution in a process of its own (`--serve`), the
later stages connect to it, and it stops once that DVC process has exited, however it exits.
A stage run by hand starts and stops its own.

For a command that runs several `dvc repro`s, or stages itself, wrap it:

    python -m pipeline.cluster -- python -m pipeline.study

The instance then lives exactly as long as the command: it stops when the command ends, fails
or is interrupted. When `RAY_ADDRESS` (or `ray.address`) names a cluster, stages and commands
simply run against that. `python -m pipeline.run` (what `make run` does) wraps `dvc repro` so.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import PARAMS_FILE, RayConfig, load_params
from pipeline.execution import ProcessRef, dvc_process

# On a Ray this pipeline starts itself, on one machine, no node can be preempted: Ray Train's
# preemption watcher would only be one more actor process per stage (~1.2 s of CPU to start,
# while the worker imports torch) and a poller beside the training loop. A cluster keeps it.
# A stage's driver passes them on to Ray Train's controller and workers.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# Where the local Ray of each `dvc repro` is announced to its stages: one file per execution.
SHARED_DIR = Path(tempfile.gettempdir()) / "pipeline-ray"
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
    resources we do not know), with this process's environment (and so its stages' and Ray's
    workers') given the Ray Train settings for one machine, values already set winning;
    returns `ray.init`'s context."""
    import ray

    for key, value in LOCAL_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    return ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **init_options)


def execution_ray_address(ray_cfg: RayConfig) -> str | None:
    """Under `dvc repro` (or `dvc exp run`), the address of that execution's one local Ray,
    started by its first Ray stage (`execution_ray`) and connected to by the rest, each saving
    the seconds of starting and stopping its own; this process's environment gets what Ray
    must know to connect. None (the stage starts its own) when run by hand, when asking for
    more CPUs than that Ray has, or once Ray is imported: Ray reads its token-authentication
    mode from the environment on import, so call this before."""
    dvc = dvc_process()
    shared = execution_ray(dvc, local_cpus(ray_cfg)) if dvc and "ray" not in sys.modules else None
    if shared is None:
        return None
    for key, value in {**LOCAL_TRAIN_ENV, **shared["env"]}.items():
        os.environ.setdefault(key, value)
    return shared["address"]


def _state_file(dvc: ProcessRef) -> Path:
    return SHARED_DIR / f"{dvc}.json"


def _live_state(state: Path) -> dict | None:
    """What a running server wrote about its Ray, or None (no server, or one that died)."""
    try:
        info = json.loads(state.read_text())
    except (OSError, ValueError):
        return None
    return info if ProcessRef.parse(info["server"]).running() else None


def execution_ray(dvc: ProcessRef, cpus: int) -> dict | None:
    """The local Ray serving `dvc`'s execution ({address, num_cpus, env, ...}), started now by
    a server process of its own (`serve`) when there is none; None when it has fewer than
    `cpus` CPUs. The server outlives the stage that started it and stops Ray once `dvc` exits,
    however it exits."""
    SHARED_DIR.mkdir(exist_ok=True)
    state = _state_file(dvc)
    with open(state.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one server, should two stages ever look at once
        info = _live_state(state)
        if info is None:
            info = _start_server(dvc, cpus, state)
    return info if info["num_cpus"] >= cpus else None


def _start_server(dvc: ProcessRef, cpus: int, state: Path) -> dict:
    log = state.with_suffix(".log")
    print(f"starting a local Ray for this execution (pid {dvc.pid}); it stops when the execution ends",
          file=sys.stderr, flush=True)
    with open(log, "w") as out:
        # A session of its own: Ctrl-C or a kill of DVC's process group must not reach it
        # before it has stopped Ray; and none of DVC's pipes, which would keep their readers waiting.
        server = subprocess.Popen([sys.executable, "-m", "pipeline.cluster", "--serve", str(dvc), str(cpus)],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while (info := _live_state(state)) is None:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the local Ray for this execution did not start within "
                               f"{SERVER_START_TIMEOUT_S} s; its log, {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return info


def serve(dvc: ProcessRef, num_cpus: int) -> int:
    """Start a local Ray, publish its address for `dvc`'s stages, and stop it once `dvc` has exited."""
    import ray

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    state = _state_file(dvc)
    context = start_local_ray(num_cpus, log_to_driver=False)
    try:
        info = {"address": context.address_info["gcs_address"], "num_cpus": num_cpus,
                "session_dir": context.address_info["session_dir"], "server": str(ProcessRef.of(os.getpid())),
                # Ray's token authentication mode, as it chose for this instance.
                "env": {key: os.environ[key] for key in ("RAY_AUTH_MODE",) if key in os.environ}}
        written = state.with_suffix(".tmp")
        written.write_text(json.dumps(info))
        written.replace(state)
        while dvc.running():
            time.sleep(SERVER_POLL_S)
    finally:
        for suffix in (".json", ".lock", ".log"):
            state.with_suffix(suffix).unlink(missing_ok=True)
        ray.shutdown()
    return 0


@contextmanager
def shared_ray(ray_cfg: RayConfig | None) -> Iterator[dict]:
    """The environment for child processes that should all use one Ray: the running cluster's
    when one is named, else a local instance started here and stopped on exit."""
    if os.environ.get("RAY_ADDRESS") or (ray_cfg is not None and ray_cfg.address):
        yield dict(os.environ)
        return
    import ray

    context = start_local_ray(local_cpus(ray_cfg), log_to_driver=False)
    try:
        yield {**os.environ, "RAY_ADDRESS": context.address_info["gcs_address"]}
    finally:
        ray.shutdown()


def params_ray_config() -> RayConfig | None:
    """`params.yaml`'s ray section when the file exists (raises ConfigError when invalid)."""
    return load_params(PARAMS_FILE).ray if os.path.exists(PARAMS_FILE) else None


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:  # started by `execution_ray`: --serve DVC_PROCESS NUM_CPUS
        return serve(ProcessRef.parse(argv[1]), int(argv[2]))
    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    if not command or command[0] in ("-h", "--help"):
        print(f"usage: python -m pipeline.cluster -- COMMAND [ARGS...]\n{__doc__}")
        return 0 if command else 2
    try:
        ray_cfg = params_ray_config()
    except ConfigError as err:
        sys.exit(f"error: {err}")
    with shared_ray(ray_cfg) as env:
        return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
