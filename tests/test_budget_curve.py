"""The time–quality curve: each budget is the default composition with its steps and rounds,
and the chosen point and the README's table come from the figures file."""

import json
from pathlib import Path

import pytest

from pipeline.compose import compose
from pipeline.config.params import ConfigError, load_params
from pipeline.tools.budget_curve import (
    BUDGETS,
    CURVE_JSON,
    README_BEGIN,
    README_END,
    Budget,
    chosen,
    markdown,
    write_readme,
)

ROOT = Path(__file__).resolve().parent.parent


def test_each_budget_composes_the_default_with_its_steps_and_rounds():
    default = compose([])  # what the budgets keep and cut
    for budget in BUDGETS:
        params = compose(["data.tuning=true", *budget.overrides(default)])
        assert params.teacher.epochs * params.teacher.steps_per_epoch == budget.teacher_steps
        assert params.student.epochs * params.student.steps_per_epoch == budget.student_steps
        assert (params.teacher.epochs, params.student.epochs) == (default.teacher.epochs, default.student.epochs)
        assert list(params.self_training.rounds.items()) == list(default.self_training.rounds.items())[:budget.rounds]
        assert params.data.tuning and params.student.dense_contrast_weight == 0.1  # the default's recipe, kept
    assert Budget(1500, 500, 2).name == "teacher 1500, student 500 × 2 rounds"


@pytest.mark.parametrize(("budget", "refusal"), [
    (Budget(1500, 500, 3), "teacher 1500, student 500 × 3 rounds: rounds: expected 1 to 2 \\(the default's\\), got 3"),
    (Budget(1500, 500, 0), "rounds: expected 1 to 2"),
    (Budget(1000, 500, 1), "must split into the default's 15 teacher and 10 student epochs"),
    (Budget(1500, 505, 1), "must split into the default's 15 teacher and 10 student epochs"),
])
def test_a_budget_the_default_cannot_take_is_refused_by_name(budget, refusal):
    with pytest.raises(ConfigError, match=refusal):
        budget.overrides(compose([]))


def test_the_curve_refuses_a_bad_budget_before_any_pipeline_runs(monkeypatch, capsys):
    from pipeline.tools import budget_curve

    def no_run(*args):
        raise AssertionError("a pipeline ran")

    monkeypatch.setattr(budget_curve, "BUDGETS", [Budget(1500, 500, 1), Budget(1500, 500, 5)])
    monkeypatch.setattr(budget_curve, "measure", no_run)
    with pytest.raises(SystemExit, match="^error: teacher 1500, student 500 × 5 rounds: rounds: expected 1 to 2"):
        budget_curve.main([])


def _curve(*points: tuple[float, float]) -> dict:
    return {"date": "2026-12-06", "commit": "0123456789abcdef", "machine": "2 CPUs (test)",
            "points": [{"name": f"budget {i}", "pipeline_s": s, "teacher_miou": 0.4, "student_miou": m}
                       for i, (s, m) in enumerate(points)]}


def test_the_chosen_budget_is_the_fastest_within_the_tolerance_of_the_best_student():
    curve = _curve((760.0, 0.595), (510.0, 0.588), (400.0, 0.570), (330.0, 0.560))
    assert chosen(curve["points"])["name"] == "budget 1"
    assert chosen(_curve((760.0, 0.595), (510.0, 0.580))["points"])["name"] == "budget 0"
    table = markdown(curve)
    assert "| budget 1 | 510 | 0.400 | 0.588 | **chosen** |" in table
    assert table.index("budget 3") < table.index("budget 0")  # fastest first
    assert "commit `0123456789` on 2 CPUs (test)" in table


def test_the_readme_block_is_replaced_from_the_figures(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\nafter\n")
    write_readme(_curve((500.0, 0.5)), readme)
    text = readme.read_text()
    assert "old" not in text and "| budget 0 | 500 | 0.400 | 0.500 | **chosen** |" in text and text.endswith("after\n")


def test_the_pipelines_budget_is_the_one_the_curve_chose():
    """The committed params.yaml against the committed curve (reports/budget_curve.json,
    measured on the tuning split, never on val): the default's steps and rounds are its
    chosen point's."""
    pick = chosen(json.loads((ROOT / CURVE_JSON).read_text())["points"])
    params = load_params(ROOT / "params.yaml")
    assert (params.teacher.epochs * params.teacher.steps_per_epoch, params.student.epochs * params.student.steps_per_epoch,
            len(params.self_training.rounds)) == (pick["teacher_steps"], pick["student_steps"], pick["rounds"])


def test_a_budget_runs_the_pipeline_on_its_own_composition_and_reads_its_metrics(tmp_path, monkeypatch):
    """`measure` with the worktree and the timed `pipeline.run` replaced: the params.yaml the run
    would see is the tuning split's default at the budget, and the figures are its metrics'."""
    import shutil

    from pipeline.run import dvc_paths
    from pipeline.tools import bench
    from pipeline.tools.budget_curve import measure

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    metrics = tmp_path / dvc_paths(tmp_path)["metrics"]
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"teacher": {"miou": 0.5}, "student": {"miou": 0.6}}))
    monkeypatch.setattr(bench, "in_worktree", lambda commit, env, run: run(tmp_path, env))
    monkeypatch.setattr(bench, "timed", lambda command, env, cwd: 321.0 if command[1:] == ["-m", "pipeline.run"] else None)
    budget = Budget(750, 250, 1)
    point = measure(budget, "0" * 40, {})
    assert point == {"teacher_steps": 750, "student_steps": 250, "rounds": 1, "name": budget.name,
                     "pipeline_s": 321.0, "teacher_miou": 0.5, "student_miou": 0.6}
    params = load_params(tmp_path / "params.yaml")
    assert params.data.tuning and list(params.self_training.rounds) == ["round1"]
    assert (params.teacher.epochs * params.teacher.steps_per_epoch, params.student.epochs * params.student.steps_per_epoch) == (750, 250)
