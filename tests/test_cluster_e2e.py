"""The cloud path as Ray's cluster launcher builds it: the head's copy of the project made from
the config's `file_mounts` and `rsync_exclude` (rsync's own pattern rules), its
`setup_commands` run in a fresh environment, then `dvc repro` there against a multi-node Ray."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "cluster").glob("*.yaml"))


def _rsync_regex(pattern: str) -> re.Pattern:
    """An `--exclude` pattern as rsync reads it: a leading / anchors it at the transfer's root,
    a pattern with no other / matches the last part of a path at any depth, * and ? stay within
    one part. (Forms this does not model are refused rather than guessed.)"""
    if "**" in pattern or "[" in pattern:
        raise ValueError(f"rsync pattern {pattern!r}: not modelled here")
    body = pattern.strip("/")
    translated = "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in body)
    return re.compile(translated if pattern.startswith("/") else f"(?:.*/)?{translated}")


def launcher_copy(source: Path, target: Path, excludes: list[str]) -> None:
    """`rsync -a --exclude …` of `source`'s contents into `target`: an excluded folder is not
    entered at all."""
    rules = [(_rsync_regex(p), p.endswith("/")) for p in excludes]
    for folder, dirs, files in os.walk(source):
        here = Path(folder).relative_to(source)
        (target / here).mkdir(parents=True, exist_ok=True)
        for name in list(dirs):
            if any(rule.fullmatch((here / name).as_posix()) for rule, _ in rules):
                dirs.remove(name)
        for name in files:
            if not any(rule.fullmatch((here / name).as_posix()) for rule, dir_only in rules if not dir_only):
                shutil.copy2(Path(folder) / name, target / here / name, follow_symlinks=False)


def test_the_rsync_model_follows_rsyncs_rules():
    assert _rsync_regex("data").fullmatch("pipeline/data") and _rsync_regex("data").fullmatch("data")
    assert _rsync_regex("/data").fullmatch("data") and not _rsync_regex("/data").fullmatch("pipeline/data")
    assert _rsync_regex("/.dvc/cache").fullmatch(".dvc/cache") and _rsync_regex("*.pyc").fullmatch("a/b.pyc")
    assert not _rsync_regex("/*.db").fullmatch("sub/mlflow.db")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_heads_copy_has_every_tracked_file_but_the_pipelines_outputs(path):
    """What the launcher syncs: the whole repository, git history included, less what a run
    makes (and DVC's cache); never a source file that happens to share a name with an output."""
    config = yaml.safe_load(path.read_text())
    assert list(config["file_mounts"].values()) == ["."]
    rules = [_rsync_regex(p) for p in config["rsync_exclude"]]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    dropped = [f for f in tracked if any(rule.fullmatch("/".join(Path(f).parts[:i]))
                                         for rule in rules for i in range(1, len(Path(f).parts) + 1))]
    assert all(f.startswith("reports/") for f in dropped), dropped  # committed metrics: DVC makes them again
    assert not any(rule.fullmatch(".git") for rule in rules)
    for made in ("data", "models", "reports", ".venv", ".dvc/cache", "mlflow.db"):
        assert any(rule.fullmatch(made) for rule in rules), made


@pytest.mark.slow
def test_the_launchers_head_copy_installs_and_runs_dvc_repro_on_two_ray_nodes(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    config = yaml.safe_load((ROOT / "cluster/aws.yaml").read_text())
    (mount, source), = config["file_mounts"].items()
    head = tmp_path / "head" / Path(mount).name
    launcher_copy(ROOT / source, head, config["rsync_exclude"])
    # A fresh environment: a Python of its own, which sees the packages already installed here
    # (the image has its own), so that `make install-system` installs the project into it alone.
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    site = next(env_dir.glob("lib/python*/site-packages"))
    (site / "installed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for command in [*config["setup_commands"], *config.get("head_setup_commands", [])]:
        result = subprocess.run(["bash", "-c", command.replace(mount, str(head))], env=env, capture_output=True,
                                text=True, timeout=900, check=False)
        assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    where = subprocess.run([env_dir / "bin/python", "-c", "import pipeline; print(pipeline.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(head))  # the head's copy, installed by its own setup command

    def sh(*cmd: str, **extra) -> str:
        result = subprocess.run(cmd, cwd=head, env={**env, **extra}, capture_output=True, text=True, timeout=1200,
                                check=False)
        assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout + result.stderr

    sh("python", "-m", "pipeline.compose", "experiment=smoke", "ray.num_workers=2", "ray.cpus_per_worker=2")
    monkeypatch.setenv("PYTHONPATH", str(head))  # the nodes' workers: the head's copy, as a node's own install
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = {cluster.add_node(num_cpus=2).node_id for _ in range(2)}
    try:
        cluster.wait_for_nodes()
        out = sh("dvc", "repro", "teacher_finetune", RAY_ADDRESS=cluster.address)
    finally:
        cluster.shutdown()
    assert "Running stage 'teacher_finetune'" in out and (head / "models/rounds/teacher.pt").is_file()
    started = re.findall(r"worker (\d)/2 pid \d+ on node (\w+)", out)
    assert {node for _, node in started} == nodes  # one training worker on each worker node
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{head / 'mlflow.db'}")
    teacher, = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "tags.`dvc.stage` = 'teacher_finetune'")
    assert teacher.data.metrics["world_size"] == 2
    assert teacher.data.metrics["replica_weight_spread"] == 0.0  # DDP kept the copies on two nodes identical
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    assert teacher.data.tags["git.commit"].removesuffix("-dirty") == commit  # the laptop's commit, synced with it
