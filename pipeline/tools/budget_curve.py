"""The default pipeline's time–quality curve: its whole run at a few step budgets, on the tuning split.

    python -m pipeline.tools.budget_curve            # every budget (about 45 minutes here), then the table
    python -m pipeline.tools.budget_curve readme     # reports/budget_curve.json's table into README.md

Each budget is the default pipeline with fewer or more teacher steps, student steps and
self-training rounds, run as a fresh clone runs it (`python -m pipeline.run` in a git worktree
of HEAD, its own DVC cache and MLflow store), on the tuning split (`data.tuning`: its val
split is more train scenes), so that the budget chosen from the curve never looked at val.
The wall seconds are the pipeline's after install, as `make run` spends them; the chosen
budget is the fastest whose student is within `TOLERANCE` of the best student of the curve.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.compose import compose, render
from pipeline.config.params import ConfigError, Params
from pipeline.data.atomic import write_text_atomic
from pipeline.tools.readme_block import write_block

CURVE_JSON = Path("reports/budget_curve.json")
README_BEGIN, README_END = "<!-- budget-curve:begin -->", "<!-- budget-curve:end -->"
# One seed on the tuning split differs from another by about this much (the study's spread of
# the same student over 3 seeds on val: ±0.003–0.017), so a budget this close to the best is
# as good as the best for choosing.
TOLERANCE = 0.01


@dataclass(frozen=True)
class Budget:
    teacher_steps: int
    student_steps: int  # per round
    rounds: int

    @property
    def name(self) -> str:
        return (f"teacher {self.teacher_steps}, student {self.student_steps} × {self.rounds} "
                f"round{'s' if self.rounds > 1 else ''}")

    def overrides(self, default: Params) -> list[str]:
        """Hydra overrides of the default composition `default`: its epochs kept (as many
        reports), the epoch's steps set to the budget, its rounds cut to the first `rounds`."""
        epochs, rounds = (default.teacher.epochs, default.student.epochs), list(default.self_training.rounds)
        if not 1 <= self.rounds <= len(rounds):
            raise ConfigError(f"{self.name}: rounds: expected 1 to {len(rounds)} (the default's), got {self.rounds}")
        if self.teacher_steps % epochs[0] or self.student_steps % epochs[1]:
            raise ConfigError(f"{self.name}: the steps must split into the default's {epochs[0]} teacher "
                              f"and {epochs[1]} student epochs")
        return [f"teacher.steps_per_epoch={self.teacher_steps // epochs[0]}",
                f"student.steps_per_epoch={self.student_steps // epochs[1]}",
                *(f"~self_training.rounds.{name}" for name in rounds[self.rounds:])]


BUDGETS = [Budget(1500, 1500, 2), Budget(1500, 500, 2), Budget(1500, 500, 1), Budget(1500, 250, 1), Budget(750, 250, 1)]


def measure(budget: Budget, commit: str, env: dict) -> dict:
    """`budget`'s pipeline on the tuning split in a worktree of `commit`, composed from that
    commit's conf/: its wall seconds and the teacher's and student's mIoU (the tuning split's val)."""
    from pipeline.run import dvc_paths
    from pipeline.tools.bench import in_worktree, timed

    def run(tree: Path, tree_env: dict) -> dict:
        conf = (tree / "conf").resolve()
        overrides = ["data.tuning=true", *budget.overrides(compose([], conf))]
        write_text_atomic(tree / "params.yaml", render(compose(overrides, conf), overrides))
        seconds = timed([sys.executable, "-m", "pipeline.run"], tree_env, cwd=tree)
        metrics = json.loads((tree / dvc_paths(tree)["metrics"]).read_text())
        return {"pipeline_s": seconds, "teacher_miou": metrics["teacher"]["miou"],
                "student_miou": metrics["student"]["miou"]}

    print(f"budget: {budget.name}", flush=True)
    return {**asdict(budget), "name": budget.name, **in_worktree(commit, env, run)}


def chosen(points: list[dict]) -> dict:
    """The fastest point whose student is within TOLERANCE of the curve's best student."""
    best = max(p["student_miou"] for p in points)
    return min((p for p in points if p["student_miou"] >= best - TOLERANCE), key=lambda p: p["pipeline_s"])


def markdown(curve: dict) -> str:
    pick = chosen(curve["points"])
    lines = [(f"Measured {curve['date']} at commit `{curve['commit'][:10]}` on {curve['machine']} by "
              "`python -m pipeline.tools.budget_curve` (`reports/budget_curve.json`): the default pipeline, "
              "each budget as a fresh clone runs it, scored on the tuning split (one seed)."), "",
             "| budget (steps) | pipeline s | teacher mIoU | student mIoU | |", "|---|---:|---:|---:|---|"]
    for p in sorted(curve["points"], key=lambda p: p["pipeline_s"]):
        mark = "**chosen**" if p == pick else ""
        lines.append(f"| {p['name']} | {p['pipeline_s']:.0f} | {p['teacher_miou']:.3f} | {p['student_miou']:.3f} | {mark} |")
    lines += ["", (f"Chosen: the fastest budget whose student is within {TOLERANCE} of the best one's "
                   f"({max(p['student_miou'] for p in curve['points']):.3f}).")]
    return "\n".join(lines)


def write_readme(curve: dict, readme: Path = Path("README.md")) -> None:
    write_block(readme, README_BEGIN, README_END, markdown(curve))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="run", choices=["run", "readme"])
    args = parser.parse_args(argv)
    if args.command == "readme":
        if not CURVE_JSON.is_file():
            sys.exit(f"error: {CURVE_JSON}: missing; run `python -m pipeline.tools.budget_curve` first")
        try:
            write_readme(json.loads(CURVE_JSON.read_text()))
        except ConfigError as err:
            sys.exit(f"error: {err}")
        return
    from pipeline.tools.bench import machine, resolve_commit

    try:  # every budget checked against the default before the first pipeline runs
        default = compose([])
        for budget in BUDGETS:
            budget.overrides(default)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    commit = resolve_commit("HEAD")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    curve = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": machine(),
             "points": [measure(budget, commit, env) for budget in BUDGETS]}
    write_text_atomic(CURVE_JSON, json.dumps(curve, indent=2) + "\n")
    print(markdown(curve))


if __name__ == "__main__":
    main()
