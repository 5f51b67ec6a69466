"""Every entry point: `--help` works, and a failure is one line on stderr and a non-zero exit."""

import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = [["-m", f"pipeline.{name}"] for name in ("run", "runtime.local_ray", "compose", "predict", "tools.study",
                                                      "tools.bench", "tools.plain")] + \
    [[str(p.relative_to(ROOT))] for p in sorted((ROOT / "stages").glob("*.py"))]


def run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(ROOT), "NO_COLOR": "1"})


@functools.cache
def help_of(entry: tuple[str, ...]) -> subprocess.CompletedProcess:
    return run([*entry, "--help"])


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: e[-1])
def test_every_entry_point_has_help(entry):
    result = help_of(tuple(entry))
    assert result.returncode == 0, result.stderr
    assert result.stdout.lower().startswith("usage") and len(result.stdout.splitlines()) > 3
    assert "\x1b[" not in result.stdout + result.stderr  # NO_COLOR: no escape codes


STAGE_OPTIONS = {"--prepared": "p", "--out": "o", "--teacher": "t.pt", "--student": "s.pt", "--encoder": "e.pt",
                 "--pretrained": "w.pt", "--pseudo": "q", "--metrics": "m.json", "--per-class": "c.csv",
                 "--figures": "f", "--fraction": "0.5", "--seed": "0", "--plan": "plan.yaml", "--rounds": "r",
                 "--params": "params.yaml", "--letters": "8", "--size": "32", "--step": "step1",
                 "--previous": "b.pt", "--classifier": "k.pt", "--features": "d.pt", "--masks": "k"}


@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "stages").glob("*.py")))
def test_a_stage_with_a_params_typo_fails_with_one_line(script, tmp_path):
    (tmp_path / "params.yaml").write_text("studnet:\n  lr: 0.1\n")
    usage = help_of((script,)).stdout
    args = [item for option, value in STAGE_OPTIONS.items() if option in usage for item in (option, value)]
    result = run([str(ROOT / script), *args], cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0, result.stderr
    assert "studnet" in result.stderr


def test_a_supervised_encoder_without_a_shipped_stand_in_fails_before_any_stage(tmp_path):
    (tmp_path / "params.yaml").write_text("model:\n  preset: r50_vit_b16\n")
    result = run(["-m", "pipeline.run"], cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: encoder.init: 'supervised' starts from the stand-in encoder "
                                    "encoders/weights/r50_vit_b16.pt"), result.stderr
